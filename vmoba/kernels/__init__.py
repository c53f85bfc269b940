"""Triton kernels of VMoBA and their host launchers (`launch.py`); tuning data in `configs.py`."""
