"""The job store's Lua scripts and the one builder of their arguments.

State changes are atomic Lua transitions: each checks the current status, updates the record and
the index sets, bumps the record's `seq`, appends the event to the replay list and publishes it,
and answers 0 when the job is gone or -1 when it is not in an allowed state (e.g. a cancelled job
must not be started).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

from .keys import (
    EXPIRY_KEY,
    INDEX_KEY,
    PREFIX,
    QUEUED_KEY,
    RUNNING_KEY,
    events_channel,
    job_key,
    owner_index_key,
    replay_key,
)
from .record import as_text, fields_json, make_event
from .status import JobStatus, Stage, enum_value

# Events kept per job for SSE resumption; a job publishes about one per denoising step.
REPLAY_LEN = 64
# Records outlive `expires_at` by this much in Redis itself, a safety net for when no janitor runs
# (the janitor deletes files first, then records).
RECORD_GRACE_S = 3600

# Turns a JSON object into HSET arguments (one argument instead of dozens).
FLAT_LUA = """
local function flat(json)
  local out = {}
  for k, v in pairs(cjson.decode(json)) do
    out[#out + 1] = k
    out[#out + 1] = v
  end
  return out
end
"""

# Create a record unless the Idempotency-Key maps to a live job or the queue is full.
# KEYS: job hash, index zset, queued zset, idempotency key, the owner's index zset
# ARGV: job id, created score, max queued (0 = no limit), use idempotency ("1"/"0"),
#       idempotency ttl s, request sha, fields (a JSON object of strings: one argument instead of
#       dozens, which costs the client less to encode), owner ('' = none: no owner index)
# Returns {"created"|"existing"|"conflict"|"full", job id, queue rank or -1}.
CREATE_LUA = (
    FLAT_LUA
    + """
if ARGV[4] == '1' then
  local existing = redis.call('GET', KEYS[4])
  if existing then
    local jk = 'vmoba:job:' .. existing
    if redis.call('EXISTS', jk) == 1 then
      if redis.call('HGET', jk, 'request_sha') ~= ARGV[6] then
        return {'conflict', existing, -1}
      end
      return {'existing', existing, redis.call('ZRANK', KEYS[3], existing) or -1}
    end
  end
end
local max = tonumber(ARGV[3])
if max > 0 and redis.call('ZCARD', KEYS[3]) >= max then
  return {'full', '', -1}
end
redis.call('HSET', KEYS[1], unpack(flat(ARGV[7])))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
if ARGV[8] ~= '' then redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1]) end
if ARGV[4] == '1' then
  redis.call('SET', KEYS[4], ARGV[1], 'EX', tonumber(ARGV[5]))
end
return {'created', ARGV[1], redis.call('ZRANK', KEYS[3], ARGV[1])}
"""
)

# Move a job between states atomically and publish the event.
# KEYS: job hash, replay list, queued zset, running zset, expiry zset
# ARGV[1] allowed current statuses, comma-separated ('' = any)
# ARGV[2] event JSON object without seq ('' = no event)
# ARGV[3] pub/sub channel
# ARGV[4] replay length, ARGV[5] replay/record TTL s (0 = leave)
# ARGV[6] job id
# ARGV[7] queued op ('add'|'rem'|''), ARGV[8] its score
# ARGV[9] running op, ARGV[10] its score
# ARGV[11] expiry op, ARGV[12] its score
# ARGV[13] hash field to increment by 1 ('' = none)
# ARGV[14] fields to set, a JSON object of strings ('{}' = none)
# Returns the event's seq, 0 if the job does not exist, -1 if its status was not allowed.
TRANSITION_LUA = (
    FLAT_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' then
  local cur = redis.call('HGET', KEYS[1], 'status')
  local ok = false
  for s in string.gmatch(ARGV[1], '[^,]+') do
    if s == cur then ok = true end
  end
  if not ok then return -1 end
end
local fields = flat(ARGV[14])
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
if ARGV[13] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[13], 1) end
local ops = {{KEYS[3], ARGV[7], ARGV[8]}, {KEYS[4], ARGV[9], ARGV[10]}, {KEYS[5], ARGV[11], ARGV[12]}}
for _, op in ipairs(ops) do
  if op[2] == 'add' then redis.call('ZADD', op[1], op[3], ARGV[6])
  elseif op[2] == 'rem' then redis.call('ZREM', op[1], ARGV[6]) end
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
if ARGV[2] ~= '' then
  local ev = '{"seq":' .. seq .. ',' .. string.sub(ARGV[2], 2)
  redis.call('RPUSH', KEYS[2], ev)
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
  redis.call('PUBLISH', ARGV[3], ev)
end
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return seq
"""
)


# Put back the record of a finished job that Redis lost (the janitor found its result, sidecar
# included, in storage), unless a record exists.
# KEYS: job hash, index zset, the owner's index zset, expiry zset
# ARGV: job id, created score, expires score, record TTL s, fields JSON, owner ('' = none)
# Returns 1 when restored, 0 when a record exists.
RESTORE_LUA = (
    FLAT_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(flat(ARGV[5])))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1]) end
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""
)


class CreateResult(NamedTuple):
    """What `create` did: `outcome` is `"created"`, `"existing"` (same Idempotency-Key and
    request), `"conflict"` (same key, another request) or `"full"` (queue full, nothing stored)."""

    outcome: str
    job_id: str
    position: Optional[int]  # 1 = next to start; None when not waiting


def create_result(out: Any) -> CreateResult:
    outcome, jid, rank = out
    rank = int(rank)
    return CreateResult(as_text(outcome), as_text(jid), rank + 1 if rank >= 0 else None)


@dataclass(frozen=True)
class ScriptCall:
    """Keys and arguments of one script call."""

    keys: list
    args: list


def create_call(
    job_id: str,
    request: dict,
    *,
    model: str,
    seed: Optional[int],
    idempotency_key: Optional[str],
    idempotency_ttl_s: int,
    max_queued: int,
    sha: str,
    now: float,
    owner: str = "",
) -> ScriptCall:
    """Arguments of `CREATE_LUA` for a new queued job (`owner`: `keys.owner_id` of the API key
    creating it, "" when keys are off)."""
    fields = {
        "status": JobStatus.queued,
        "stage": Stage.queued,
        "progress": 0,
        "step": 0,
        "total_steps": int(request.get("num_inference_steps") or 0),
        "request": request,
        "seed": seed,
        "model": model,
        "created_at": now,
        "attempts": 0,
        "seq": 0,
        "request_sha": sha,
        "files": [],
        "owner": owner,
    }
    keys = [
        job_key(job_id),
        INDEX_KEY,
        QUEUED_KEY,
        idempotency_key or f"{PREFIX}idem:-",
        owner_index_key(owner or "-"),
    ]
    args = [
        job_id,
        repr(now),
        int(max_queued or 0),
        "1" if idempotency_key else "0",
        int(idempotency_ttl_s),
        sha,
        fields_json(fields),
        owner,
    ]
    return ScriptCall(keys, args)


def transition_call(
    job_id: str,
    *,
    allowed: Iterable[Any] = (),
    event: str = "",
    fields: Optional[dict] = None,
    queued: str = "",
    running: str = "",
    expiry: str = "",
    score: float = 0.0,
    ttl_s: int = 0,
    incr: str = "",
    **event_extra: Any,
) -> ScriptCall:
    """Arguments of `TRANSITION_LUA`: allowed current statuses, the event to publish (none when
    `event` is empty), fields to set, index set operations (`"add"`/`"rem"`) at `score`."""
    fields = dict(fields or {})
    ev = json.dumps(make_event(fields, job_id, event, **event_extra)) if event else ""
    keys = [job_key(job_id), replay_key(job_id), QUEUED_KEY, RUNNING_KEY, EXPIRY_KEY]
    args = [
        ",".join(enum_value(s) for s in allowed),
        ev,
        events_channel(job_id),
        REPLAY_LEN,
        int(ttl_s),
        job_id,
        queued,
        repr(score),
        running,
        repr(score),
        expiry,
        repr(score),
        incr,
        fields_json(fields),
    ]
    return ScriptCall(keys, args)


def end_call(
    job_id: str, status: JobStatus, allowed: Iterable[Any], retention_s: int, **extra: Any
) -> ScriptCall:
    """`allowed` -> a terminal `status`: kept `retention_s`, out of the queued/running indexes."""
    now = time.time()
    fields = {"status": status, "completed_at": now, "expires_at": now + retention_s, **extra}
    return transition_call(
        job_id,
        allowed=allowed,
        event=status.value,
        fields=fields,
        queued="rem",
        running="rem",
        expiry="add",
        score=fields["expires_at"],
        ttl_s=retention_s + RECORD_GRACE_S,
    )


def restore_call(job_id: str, fields: dict, *, created_at: float, expires_at: float) -> ScriptCall:
    """Arguments of `RESTORE_LUA`: a terminal record with `fields` (its `owner` among them),
    listed at `created_at`, removed by retention at `expires_at`."""
    owner = str(fields.get("owner") or "")
    keys = [job_key(job_id), INDEX_KEY, owner_index_key(owner or "-"), EXPIRY_KEY]
    ttl = max(1, int(expires_at - time.time()) + RECORD_GRACE_S)
    args = [
        job_id,
        repr(created_at),
        repr(expires_at),
        ttl,
        fields_json({**fields, "created_at": created_at, "expires_at": expires_at}),
        owner,
    ]
    return ScriptCall(keys, args)
