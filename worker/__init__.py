"""GPU (or CPU, MODEL=tiny) worker: pipeline loading, jobs, progress, storage, video encoding."""
