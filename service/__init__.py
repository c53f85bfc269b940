"""The HTTP service: FastAPI app (`service.app`), job records (`service.jobs`), request schemas
(`service.schemas`), settings (`service.settings`), `make serve` (`service.serve`) and the
`vmoba` command-line client (`service.cli`). Never imports torch."""
