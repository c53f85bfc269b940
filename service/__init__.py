"""The HTTP service: the FastAPI app (`service.app`), routes, auth, errors, SSE, views, metrics,
settings (`service.settings`), `make serve` (`service.serve`) and the `vmoba` command-line client
(`service.cli`). What it shares with the workers lives in `contract`. Never imports torch."""
