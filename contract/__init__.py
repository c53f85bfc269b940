"""What the API (`service/`) and the workers (`worker/`) agree on, and nothing else.

Torch-free and HTTP-free: job statuses and error codes (`status`), the request and its validated
form (`request`), job ids and the Redis key layout (`keys`), the job record codec (`record`), the
job store (`scripts`, `store`), worker heartbeats (`heartbeats`), job metrics (`metrics`), the
results file layout (`files`), the one enqueue call (`enqueue`), the settings both processes
read (`settings`) and the process supervision both launchers use (`supervise`).
"""
