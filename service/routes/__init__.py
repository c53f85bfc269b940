"""HTTP routes: `native` (/generate, /jobs), `openai` (/v1/videos), `ops` (health, metrics, models).

Both job families share `common` (lookups, cancel, delete, file answers) and `submit`."""
