"""Lua scripts of the Redis engine: each state change that belongs together, atomically.

Key layout (docs/redis.md, binding), with ``P`` the prefix:
``P:cmd:ID`` hash, ``P:agent:ID:pending`` zset (score ts), ``P:deadlines`` zset
(score deadline; the sweepers' index), ``P:agent:ID`` hash, ``P:agents`` set,
``P:agent:ID:events`` list (frames queued for an agent that is away) and
``P:queues`` zset (the agent ids that have such a list, score: last push ms;
the bound of their number, docs/redis.md). History (``list_commands``):
``P:history`` zset of every retained command (member: msgpack ``[id, agent,
key, job]``, so the trim knows which other indexes to clean; score ts) and
zsets of command ids, score ts: ``P:history:agent:ID``, ``P:history:key:KEY``,
``P:history:job:JOB`` (written by CREATE) and ``P:history:outcome:OUTCOME``
(written when the command completes).

Scripts that walk an agent's pending index build the ``P:cmd:ID`` key names
they touch from the prefix (ARGV[1]); that is fine on a single Redis or a
Sentinel-managed primary, not on Redis Cluster (which this hub does not use).
Every script returns plain arrays; ``redis.py`` turns them into records.
"""

from __future__ import annotations

from typing import Final

__all__ = ["JOB_COUNT_FIELDS", "JOB_INFO_FIELDS", "SCRIPTS"]

# KEYS: 1 P:cmd:ID, 2 P:agent:AGENT:pending, 3 P:deadlines, 4 P:history,
#       5 P:history:agent:AGENT, 6 P:history:key:KEY; a job's part also
#       7 P:job:JOB and 8 P:history:job:JOB
# ARGV: 1 prefix, 2 id, 3 agent, 4 key, 5 group ('' = none), 6 ts, 7 deadline ('' = none),
#       8 origin, 9 payload (msgpack), 10 drop ('' | '*' | 'k:<command key>'),
#       11 max_pending (0 = no limit), 12 retention ms, 13 dropped result (msgpack),
#       14 locate ('1': look up the agent's hub; '0' returns '' as location),
#       15 job id ('' = none), 16 history card (msgpack [id, agent, key, job])
# Returns {0, HGETALL} when the id exists (idempotent submit; a hub other than the
# command's origin that submits it again while it is not COMPLETE is added to its
# 'watchers' field, so it is told of the completion too), {-1} over the
# limit, else {1, coalesced, {{id, key, group, origin, ts, job}...dropped}, location} with
# location the hub the agent is connected to ('' if none).
#
# A job's part (ARGV[15] the job id, KEYS[7] P:job:JOB): in the same step, the
# agent's part of the job (field p:AGENT: '' not started, '!' skipped, else the
# command id) is claimed for this command, which is stored with field 'job'. The
# part is refused, {-2, reason, claimed id}, when it started with another id (or
# its command is gone), was skipped, the job is not RUNNING or was cancelled, or
# another hub than ARGV[8] runs it: a part never starts twice (docs/fleets.md).
CREATE: Final = """
local job = ARGV[15] or ''
if job ~= '' then
  local agent = ARGV[3]
  local j = redis.call('HMGET', KEYS[7], 'status', 'origin', 'cancelled', 'p:' .. agent)
  if not j[1] then return {-2, 'no job ' .. job, ''} end
  local exists = redis.call('EXISTS', KEYS[1]) == 1
  local part = j[4]
  if part and part ~= '' and part ~= '!' then
    if not (part == ARGV[2] and exists) then
      return {-2, 'the part of ' .. agent .. ' started already', part}
    end
  else
    if not part then return {-2, agent .. ' is not a target of job ' .. job, ''} end
    if part == '!' then return {-2, 'the part of ' .. agent .. ' was skipped', ''} end
    if j[1] ~= 'RUNNING' or j[3] == '1' then return {-2, 'job ' .. job .. ' is not running', ''} end
    if j[2] ~= ARGV[8] then return {-2, 'job ' .. job .. ' is run by hub ' .. j[2], ''} end
    if exists then return {-2, 'command id ' .. ARGV[2] .. ' exists already', ''} end
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local f = redis.call('HMGET', KEYS[1], 'status', 'origin', 'watchers')
  if f[1] ~= 'COMPLETE' and f[2] ~= ARGV[8] then
    local w = f[3] or ''
    if not string.find(',' .. w .. ',', ',' .. ARGV[8] .. ',', 1, true) then
      redis.call('HSET', KEYS[1], 'watchers', w == '' and ARGV[8] or (w .. ',' .. ARGV[8]))
    end
  end
  return {0, redis.call('HGETALL', KEYS[1])}
end
local maxp = tonumber(ARGV[11])
if maxp > 0 and redis.call('ZCARD', KEYS[2]) >= maxp then
  return {-1}
end
local dropped = {}
local coalesced = 0
local drop = ARGV[10]
local group = ARGV[5]
if drop ~= '' or group ~= '' then
  for _, other in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    local ok = ARGV[1] .. ':cmd:' .. other
    local f = redis.call('HMGET', ok, 'status', 'group', 'key', 'origin', 'ts', 'job')
    if not f[1] then
      redis.call('ZREM', KEYS[2], other)
    else
      local selected = false
      if drop ~= '' and f[1] == 'PENDING' then
        if string.sub(drop, 1, 2) == 'k:' then
          selected = (f[3] == string.sub(drop, 3))
        else
          selected = (group == '' or f[2] ~= group)
        end
      end
      if selected then
        redis.call('HSET', ok, 'status', 'COMPLETE', 'outcome', 'dropped',
                   'updated', ARGV[6], 'result', ARGV[13])
        redis.call('PEXPIRE', ok, ARGV[12])
        redis.call('ZREM', KEYS[2], other)
        redis.call('ZREM', KEYS[3], other)
        redis.call('ZADD', ARGV[1] .. ':history:outcome:dropped', f[5], other)
        table.insert(dropped, {other, f[3], f[2], f[4], f[5], f[6] or ''})
      elseif group ~= '' and f[2] == group then
        coalesced = 1
      end
    end
  end
end
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'agent', ARGV[3], 'key', ARGV[4],
           'status', 'PENDING', 'outcome', '', 'group', group, 'ts', ARGV[6],
           'updated', ARGV[6], 'deadline', ARGV[7], 'origin', ARGV[8], 'payload', ARGV[9],
           'job', job)
if job ~= '' then
  redis.call('HSET', KEYS[7], 'p:' .. ARGV[3], ARGV[2])
  redis.call('HINCRBY', KEYS[7], 'n:started', 1)
end
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[2])
if ARGV[7] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[7], ARGV[2])
end
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[16])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[2])
redis.call('ZADD', KEYS[6], ARGV[6], ARGV[2])
if job ~= '' then
  redis.call('ZADD', KEYS[8], ARGV[6], ARGV[2])
end
-- Where the agent is connected, so the caller can route the command there
-- in the same turn (docs/deployment.md, How it works).
local location = ''
if ARGV[14] == '1' then
  location = redis.call('HGET', ARGV[1] .. ':agent:' .. ARGV[3], 'hub') or ''
end
return {1, coalesced, dropped, location}
"""

# KEYS: 1 P:cmd:ID.  ARGV: 1 agent, 2 now.
# Returns 1 applied, 0 unknown, -1 other agent's, -2 COMPLETE.
MARK_ACTIVE: Final = """
local f = redis.call('HMGET', KEYS[1], 'status', 'agent')
if not f[1] then return 0 end
if f[2] ~= ARGV[1] then return -1 end
if f[1] == 'COMPLETE' then return -2 end
redis.call('HSET', KEYS[1], 'status', 'ACTIVE', 'updated', ARGV[2])
return 1
"""

# Complete if not COMPLETE: the first answer wins (docs/guide.md, Guarantees).
# An answer (outcome ok or error) is refused once the deadline passed: a command
# past its deadline only ever ends timeout or cancelled. An answer to a group
# member completes, in the same step, every PENDING member of its group whose
# deadline has not passed (docs/guide.md, groups): a member submitted after this step
# is not part of it, and runs.
# KEYS: 1 P:cmd:ID, 2 P:deadlines
# ARGV: 1 prefix, 2 outcome, 3 now, 4 result, 5 error, 6 required agent ('' = any),
#       7 retention ms
# Returns {1, agent, key, group, origin, ts, deadline, {{id, key, origin, ts, job}...members},
# watchers, job}, or {0} unknown, {-1} other agent's, {-2} already COMPLETE, {-3} past its
# deadline. ``watchers``: the other hubs waiting on it (comma-separated, see CREATE).
# Each command completed is added to P:history:outcome:OUTCOME (score: its ts).
COMPLETE: Final = """
local f = redis.call('HMGET', KEYS[1], 'status', 'agent', 'key', 'group', 'origin', 'ts',
                     'deadline', 'id', 'watchers', 'job')
if not f[1] then return {0} end
if ARGV[6] ~= '' and f[2] ~= ARGV[6] then return {-1} end
if f[1] == 'COMPLETE' then return {-2} end
local now = tonumber(ARGV[3])
local answer = ARGV[2] == 'ok' or ARGV[2] == 'error'
if answer and f[7] and f[7] ~= '' and tonumber(f[7]) <= now then return {-3} end
redis.call('HSET', KEYS[1], 'status', 'COMPLETE', 'outcome', ARGV[2], 'updated', ARGV[3],
           'result', ARGV[4], 'error', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
local pending = ARGV[1] .. ':agent:' .. f[2] .. ':pending'
local by_outcome = ARGV[1] .. ':history:outcome:' .. ARGV[2]
redis.call('ZREM', pending, f[8])
redis.call('ZREM', KEYS[2], f[8])
redis.call('ZADD', by_outcome, f[6], f[8])
local members = {}
if answer and f[4] and f[4] ~= '' then
  for _, id in ipairs(redis.call('ZRANGE', pending, 0, -1)) do
    local k = ARGV[1] .. ':cmd:' .. id
    local m = redis.call('HMGET', k, 'status', 'group', 'key', 'origin', 'ts', 'deadline', 'job')
    if m[1] == 'PENDING' and m[2] == f[4]
        and not (m[6] and m[6] ~= '' and tonumber(m[6]) <= now) then
      redis.call('HSET', k, 'status', 'COMPLETE', 'outcome', ARGV[2], 'updated', ARGV[3],
                 'result', ARGV[4], 'error', ARGV[5])
      redis.call('PEXPIRE', k, ARGV[7])
      redis.call('ZREM', pending, id)
      redis.call('ZREM', KEYS[2], id)
      redis.call('ZADD', by_outcome, m[5], id)
      table.insert(members, {id, m[3], m[4], m[5], m[7] or ''})
    end
  end
end
return {1, f[2], f[3], f[4], f[5], f[6], f[7], members, f[9] or '', f[10] or ''}
"""

# History: retained commands matching the filters, newest first (ts, then id).
# KEYS: the indexes that apply (P:history alone when no filter has one): the
# smallest is walked. ARGV: 1 prefix, 2 agent, 3 key, 4 status, 5 outcome, 6 job
# ('' = any), 7 limit, 8 before ts ('' = from the newest), 9 before id, 10 entries to
# look at, at most, 11 '1' when KEYS[1] is P:history (members are msgpack cards).
# An index is walked one score (ms) at a time, each score's entries by id, newest
# first, so that the order is total and the same whichever index is walked.
# Returns {{HGETALL...}, more (1: stopped before the index's end), last ts, last id}.
# Entries whose hash expired are removed from the walked index on the way.
LIST_COMMANDS: Final = """
local idx = KEYS[1]
local best = redis.call('ZCARD', idx)
for i = 2, #KEYS do
  local n = redis.call('ZCARD', KEYS[i])
  if n < best then idx, best = KEYS[i], n end
end
local packed = ARGV[11] == '1'
local limit, budget = tonumber(ARGV[7]), tonumber(ARGV[10])
local cts, cid = tonumber(ARGV[8]), ARGV[9]
local want = {agent = ARGV[2], key = ARGV[3], job = ARGV[6], status = ARGV[4],
              outcome = ARGV[5]}
local out, scanned, more = {}, 0, 0
local last_ts, last_id = '', ''
local max = cts and ARGV[8] or '+inf'
while true do
  if #out >= limit or scanned >= budget then more = 1 break end
  local batch = redis.call('ZREVRANGEBYSCORE', idx, max, '-inf', 'WITHSCORES', 'LIMIT', 0, 256)
  if #batch == 0 then break end
  local i = 1
  while i <= #batch do
    local s = batch[i + 1]
    local members = {}
    if #batch == 512 and s == batch[#batch] then
      members = redis.call('ZRANGEBYSCORE', idx, s, s)  -- the whole group of that ms
      i = #batch + 1
    else
      while i <= #batch and batch[i + 1] == s do
        table.insert(members, batch[i])
        i = i + 2
      end
    end
    local entries = {}
    for _, m in ipairs(members) do
      local id = packed and cmsgpack.unpack(m)[1] or m
      if not (cts and tonumber(s) == cts and id >= cid) then
        table.insert(entries, {id, m})
      end
    end
    table.sort(entries, function(a, b) return a[1] > b[1] end)
    for _, e in ipairs(entries) do
      if #out >= limit or scanned >= budget then
        return {out, 1, last_ts, last_id}
      end
      scanned = scanned + 1
      last_ts, last_id = s, e[1]
      local k = ARGV[1] .. ':cmd:' .. e[1]
      local f = redis.call('HMGET', k, 'agent', 'key', 'job', 'status', 'outcome')
      if not f[1] then
        redis.call('ZREM', idx, e[2])
      elseif (want.agent == '' or f[1] == want.agent) and (want.key == '' or f[2] == want.key)
          and (want.job == '' or f[3] == want.job)
          and (want.status == '' or f[4] == want.status)
          and (want.outcome == '' or f[5] == want.outcome) then
        table.insert(out, redis.call('HGETALL', k))
      end
    end
    max = '(' .. s
  end
end
return {out, more, last_ts, last_id}
"""

# Remove the history entries of commands whose hash expired and whose ts is at or
# before the cutoff (now - retention: no command newer than that can have expired).
# KEYS: 1 P:history.  ARGV: 1 prefix, 2 cutoff, 3 limit.  Returns how many were removed.
# Entries of commands still retained past the cutoff (a long timeout) are passed over.
TRIM_HISTORY: Final = """
local prefix, limit = ARGV[1], tonumber(ARGV[3])
local removed, offset, visited = 0, 0, 0
local outcomes = {'ok', 'error', 'timeout', 'cancelled', 'dropped'}
while removed < limit and visited < 2 * limit do
  local batch = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', offset, 100)
  for _, m in ipairs(batch) do
    visited = visited + 1
    local c = cmsgpack.unpack(m)
    local id = c[1]
    if redis.call('EXISTS', prefix .. ':cmd:' .. id) == 1 then
      offset = offset + 1
    else
      redis.call('ZREM', KEYS[1], m)
      redis.call('ZREM', prefix .. ':history:agent:' .. c[2], id)
      redis.call('ZREM', prefix .. ':history:key:' .. c[3], id)
      if type(c[4]) == 'string' then
        redis.call('ZREM', prefix .. ':history:job:' .. c[4], id)
      end
      for _, o in ipairs(outcomes) do
        redis.call('ZREM', prefix .. ':history:outcome:' .. o, id)
      end
      removed = removed + 1
    end
  end
  if #batch < 100 then break end
end
return removed
"""

# last_seen of the agents connected to one hub, in one call.
# ARGV: 1 prefix, 2 now, then (agent id, session) pairs.  Returns how many were updated
# (a record that is another session's, or gone, is left alone).
TOUCH_AGENTS: Final = """
local n = 0
for i = 3, #ARGV, 2 do
  local k = ARGV[1] .. ':agent:' .. ARGV[i]
  if redis.call('HGET', k, 'session') == ARGV[i + 1] then
    redis.call('HSET', k, 'last_seen', ARGV[2])
    n = n + 1
  end
end
return n
"""

# KEYS: 1 P:agent:AGENT:pending.  ARGV: 1 prefix, 2 group.
# Returns HGETALL of the oldest command of the group not COMPLETE, or {}.
NEXT_IN_GROUP: Final = """
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local k = ARGV[1] .. ':cmd:' .. id
  if redis.call('HGET', k, 'group') == ARGV[2] then
    return redis.call('HGETALL', k)
  end
end
return {}
"""

# KEYS: 1 P:agent:AGENT:pending.  ARGV: 1 prefix.
# Returns {HGETALL...} oldest first; drops index entries whose hash is gone.
LIST_PENDING: Final = """
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local h = redis.call('HGETALL', ARGV[1] .. ':cmd:' .. id)
  if #h == 0 then
    redis.call('ZREM', KEYS[1], id)
  else
    table.insert(out, h)
  end
end
return out
"""

# KEYS: 1 P:deadlines.  ARGV: 1 prefix, 2 now, 3 limit.
# Returns {HGETALL...} of overdue commands not COMPLETE; cleans stale entries.
OVERDUE: Final = """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])) do
  local k = ARGV[1] .. ':cmd:' .. id
  local st = redis.call('HGET', k, 'status')
  if (not st) or st == 'COMPLETE' then
    redis.call('ZREM', KEYS[1], id)
  else
    table.insert(out, redis.call('HGETALL', k))
  end
end
return out
"""

# KEYS: 1 P:agent:ID, 2 P:agents, 3 P:hub:HUB:agents (this hub's members)
# ARGV: 1 id, 2 hub, 3 session, 4 connected, 5 last_seen, 6 meta, 7 prefix
# Returns the HGETALL of the record it replaces ({} if none).
REGISTER_AGENT: Final = """
local old = redis.call('HGETALL', KEYS[1])
local old_hub = redis.call('HGET', KEYS[1], 'hub')
if old_hub and old_hub ~= ARGV[2] then
  redis.call('SREM', ARGV[7] .. ':hub:' .. old_hub .. ':agents', ARGV[1])
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'hub', ARGV[2], 'session', ARGV[3],
           'connected', ARGV[4], 'last_seen', ARGV[5], 'meta', ARGV[6])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return old
"""

# KEYS: 1 P:agent:ID, 2 P:agents.  ARGV: 1 id, 2 session, 3 prefix.  Returns 1 if removed.
UNREGISTER_AGENT: Final = """
local f = redis.call('HMGET', KEYS[1], 'session', 'hub')
if f[1] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', ARGV[3] .. ':hub:' .. f[2] .. ':agents', ARGV[1])
return 1
"""

# A hub says it is alive (docs/redis.md, P:hub:HUB_ID:alive).
# KEYS: 1 P:hub:HUB:alive, 2 P:hubs.  ARGV: 1 hub id, 2 ttl ms.
# Returns 1 if the key was still there, 0 if it had lapsed (the hub was frozen or cut
# off longer than its ttl, or Redis lost it): its agents may have been reaped.
HUB_ALIVE: Final = """
local was = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return was
"""

# A hub starts: forget the agents a previous life of the same hub id left registered.
# KEYS: 1 P:hub:HUB:agents, 2 P:agents.  ARGV: 1 prefix, 2 hub id.
# Returns {HGETALL...} of the agents removed.
HUB_RESET: Final = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local k = ARGV[1] .. ':agent:' .. id
  if redis.call('HGET', k, 'hub') == ARGV[2] then
    table.insert(out, redis.call('HGETALL', k))
    redis.call('DEL', k)
    redis.call('SREM', KEYS[2], id)
  end
end
redis.call('DEL', KEYS[1])
return out
"""

# Register an agent again after its record may have been lost (reaped, Redis emptied),
# unless another connection registered it meanwhile (a newer session elsewhere wins).
# KEYS: 1 P:agent:ID, 2 P:agents, 3 P:hub:HUB:agents.
# ARGV: 1 id, 2 hub, 3 session, 4 connected, 5 last_seen, 6 meta.
# Returns 1 if written, 0 if another session holds the record.
RESTORE_AGENT: Final = """
local session = redis.call('HGET', KEYS[1], 'session')
if session and session ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'hub', ARGV[2], 'session', ARGV[3],
           'connected', ARGV[4], 'last_seen', ARGV[5], 'meta', ARGV[6])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

# Forget hubs whose alive key expired and the agents they held.
# KEYS: 1 P:hubs, 2 P:agents.  ARGV: 1 prefix, 2 this hub's id.
# Returns {HGETALL...} of the agents removed.
REAP_DEAD_HUBS: Final = """
local out = {}
for _, hub in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if hub ~= ARGV[2] and redis.call('EXISTS', ARGV[1] .. ':hub:' .. hub .. ':alive') == 0 then
    local members = ARGV[1] .. ':hub:' .. hub .. ':agents'
    for _, id in ipairs(redis.call('SMEMBERS', members)) do
      local k = ARGV[1] .. ':agent:' .. id
      if redis.call('HGET', k, 'hub') == hub then
        table.insert(out, redis.call('HGETALL', k))
        redis.call('DEL', k)
        redis.call('SREM', KEYS[2], id)
      end
    end
    redis.call('DEL', members)
    redis.call('SREM', KEYS[1], hub)
  end
end
return out
"""

# A hub leaves the cluster cleanly. KEYS: 1 P:hub:HUB:alive, 2 P:hubs, 3 P:hub:HUB:agents.
# ARGV: 1 hub id.
HUB_GONE: Final = """
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('SCARD', KEYS[3]) == 0 then redis.call('DEL', KEYS[3]) end
return 1
"""

# Progress for a command: check it is the agent's and not COMPLETE; tell its origin.
# KEYS: 1 P:cmd:ID.  ARGV: 1 agent ('' = any).  Returns {1, origin} or {0|-1|-2}.
PROGRESS_CHECK: Final = """
local f = redis.call('HMGET', KEYS[1], 'status', 'agent', 'origin')
if not f[1] then return {0} end
if ARGV[1] ~= '' and f[2] ~= ARGV[1] then return {-1} end
if f[1] == 'COMPLETE' then return {-2} end
return {1, f[3]}
"""

# KEYS: 1 P:agent:ID:events.  ARGV: 1 ttl ms, 2.. entries, newest first (LPUSH order).
# Puts frames back at the head of the queue, with the queue's own expiry.
# Shared by QUEUE_FRAME and REQUEUE_FRAMES: an agent id about to get a queue
# makes room for it under the bound of queues (P:queues, KEYS[2]). Ids whose
# last push is older than the ttl are forgotten first (their list expired with
# that ttl); then, if the agent has no queue yet and the bound is reached, the
# oldest queues by last push are deleted and their frames counted in
# ``evicted``. Needs: now, cutoff, max_queues, agent, prefix (locals).
_MAKE_QUEUE_ROOM: Final = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
local evicted = 0
if not redis.call('ZSCORE', KEYS[2], agent) then
  local over = redis.call('ZCARD', KEYS[2]) - max_queues + 1
  if over > 0 then
    for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, over - 1)) do
      local key = prefix .. ':agent:' .. id .. ':events'
      evicted = evicted + redis.call('LLEN', key)
      redis.call('DEL', key)
    end
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
  end
end
redis.call('ZADD', KEYS[2], now, agent)
"""

# KEYS: 1 P:agent:ID:events, 2 P:queues.  ARGV: 1 ttl ms, 2 now, 3 max queues, 4 agent id,
# 5 prefix, 6... entries (msgpack [ts, frame]) newest first.  Returns the frames
# evicted from other queues to make room.
REQUEUE_FRAMES: Final = """
local now, cutoff = tonumber(ARGV[2]), tonumber(ARGV[2]) - tonumber(ARGV[1])
local max_queues, agent, prefix = tonumber(ARGV[3]), ARGV[4], ARGV[5]
""" + _MAKE_QUEUE_ROOM + """
redis.call('LPUSH', KEYS[1], unpack(ARGV, 6))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return evicted
"""

# KEYS: 1 P:agents.  ARGV: 1 prefix.  Returns {HGETALL...}; forgets ids whose hash is gone.
LIST_AGENTS: Final = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = redis.call('HGETALL', ARGV[1] .. ':agent:' .. id)
  if #h == 0 then
    redis.call('SREM', KEYS[1], id)
  else
    table.insert(out, h)
  end
end
return out
"""

# KEYS: 1 P:agent:ID:events, 2 P:queues.  ARGV: 1 entry (msgpack [ts, frame]),
# 2 max length, 3 ttl ms, 4 expiry cutoff (now - ttl: entries with ts <= it are
# expired), 5 now, 6 max queues, 7 agent id, 8 prefix.
# Returns {1 queued / 0 full, expired entries dropped, frames evicted}. A full
# queue first drops its expired head entries, as the memory engine does. The
# list's own TTL is refreshed so an agent that never returns does not leave its
# queue behind forever; a new queue makes room under the bound of queues.
QUEUE_FRAME: Final = """
local max = tonumber(ARGV[2])
local cutoff = tonumber(ARGV[4])
local expired = 0
if redis.call('LLEN', KEYS[1]) >= max then
  while true do
    local head = redis.call('LINDEX', KEYS[1], 0)
    if not head then break end
    -- ts: the msgpack uint after the array header (fixint, or 0xcc..0xcf + 1/2/4/8 bytes)
    local b, ts = string.byte(head, 2), nil
    if b < 0x80 then ts = b elseif b >= 0xcc and b <= 0xcf then
      ts = 0
      for i = 3, 2 + 2 ^ (b - 0xcc) do ts = ts * 256 + string.byte(head, i) end
    end
    if ts == nil or ts > cutoff then break end
    redis.call('LPOP', KEYS[1])
    expired = expired + 1
  end
  if redis.call('LLEN', KEYS[1]) >= max then return {0, expired, 0} end
end
local now, max_queues, agent, prefix = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]
""" + _MAKE_QUEUE_ROOM + """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, expired, evicted}
"""

# KEYS: 1 P:agent:ID:events, 2 P:queues.  ARGV: 1 agent id.  Returns every entry,
# oldest first, and empties the list.
TAKE_FRAMES: Final = """
local all = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return all
"""

# -- jobs (docs/fleets.md, docs/redis.md) ---------------------------------------
# P:job:ID hash: id, key, payload, target, agents (msgpack), status RUNNING|COMPLETE,
# ts, updated, batch, max_failures ('' = none), origin (the hub running it),
# timeout (ms, '' = the hub's default), cancelled ('0'|'1'); counters n:agents,
# n:started, n:skipped, n:ended, n:<outcome>; per target agent p:AGENT ('' not
# started, '!' skipped, else its command id) and o:AGENT (outcome once ended).
# P:jobs zset (score ts) lists jobs; P:jobs:running set: the RUNNING ones.

# A job is COMPLETE once every part ended or was skipped: then it expires
# after the retention period and leaves P:jobs:running (KEYS[1], KEYS[2]).
_JOB_FINISH = """
local function finish(now, retention)
  local f = redis.call('HMGET', KEYS[1], 'status', 'n:agents', 'n:ended', 'n:skipped', 'id')
  if f[1] == 'RUNNING' and tonumber(f[3]) + tonumber(f[4]) >= tonumber(f[2]) then
    redis.call('HSET', KEYS[1], 'status', 'COMPLETE', 'updated', now)
    redis.call('PEXPIRE', KEYS[1], retention)
    redis.call('SREM', KEYS[2], f[5])
  end
end
"""

# The fields of a job without its parts (list_jobs, end_job_parts).
JOB_INFO_FIELDS: Final = ("id", "key", "payload", "target", "agents", "status", "ts", "updated",
                          "batch", "max_failures", "origin", "n:agents", "n:started",
                          "n:skipped", "n:ok", "n:error", "n:timeout", "n:cancelled",
                          "n:dropped")
_JOB_INFO = "local JOB_INFO = {" + ", ".join(f"'{f}'" for f in JOB_INFO_FIELDS) + "}\n"
# The fields end_job_parts answers with (no agents, payload, target: see base.py).
JOB_COUNT_FIELDS: Final = tuple(f for f in JOB_INFO_FIELDS
                                if f not in ("agents", "payload", "target"))
_JOB_COUNTS = "local JOB_COUNTS = {" + ", ".join(f"'{f}'" for f in JOB_COUNT_FIELDS) + "}\n"

# KEYS: 1 P:job:ID, 2 P:jobs, 3 P:jobs:running
# ARGV: 1 prefix, 2 id, 3 key, 4 payload, 5 target, 6 agents (msgpack list), 7 ts,
#       8 batch, 9 max_failures, 10 origin, 11 timeout, 12 retention ms, 13.. agent ids
# Returns {0, HGETALL} when the job exists (idempotent), else {1, HGETALL}.
CREATE_JOB: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGETALL', KEYS[1])}
end
local n = #ARGV - 12
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'key', ARGV[3], 'payload', ARGV[4],
           'target', ARGV[5], 'agents', ARGV[6], 'status', 'RUNNING', 'ts', ARGV[7],
           'updated', ARGV[7], 'batch', ARGV[8], 'max_failures', ARGV[9], 'origin', ARGV[10],
           'timeout', ARGV[11], 'cancelled', '0', 'n:agents', n, 'n:started', 0,
           'n:skipped', 0, 'n:ended', 0)
for i = 13, #ARGV do
  redis.call('HSET', KEYS[1], 'p:' .. ARGV[i], '')
end
redis.call('ZADD', KEYS[2], ARGV[7], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
-- The index forgets jobs whose hash expired (retention), a few at a time.
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[7]) - tonumber(ARGV[12]),
                       'LIMIT', 0, 100)
for _, id in ipairs(old) do
  if redis.call('EXISTS', ARGV[1] .. ':job:' .. id) == 0 then
    redis.call('ZREM', KEYS[2], id)
  end
end
return {1, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: 1 P:jobs.  ARGV: 1 prefix, 2 limit.  Newest first; jobs whose hash expired
# are skipped (create_job forgets them).
LIST_JOBS: Final = _JOB_INFO + """
local out = {}
local want = tonumber(ARGV[2])
local start = 0
for _ = 1, 10 do
  local ids = redis.call('ZREVRANGE', KEYS[1], start, start + want - 1)
  start = start + #ids
  for _, id in ipairs(ids) do
    local k = ARGV[1] .. ':job:' .. id
    if #out < want and redis.call('EXISTS', k) == 1 then
      table.insert(out, redis.call('HMGET', k, unpack(JOB_INFO)))
    end
  end
  if #ids < want or #out >= want then break end
end
return out
"""

# KEYS: 1 P:job:ID, 2 P:jobs:running.  ARGV: 1 now, 2 retention ms, 3.. agent, outcome
# pairs of started parts.  Each part's outcome is recorded once.  Returns the job's info
# fields (JOB_INFO_FIELDS), or {} for an unknown job.
END_JOB_PARTS: Final = _JOB_FINISH + _JOB_COUNTS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local ended = 0
for i = 3, #ARGV, 2 do
  -- Only started parts end (the hub records the parts it started: no check here).
  if redis.call('HSETNX', KEYS[1], 'o:' .. ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('HINCRBY', KEYS[1], 'n:' .. ARGV[i + 1], 1)
    ended = ended + 1
  end
end
redis.call('HINCRBY', KEYS[1], 'n:ended', ended)
redis.call('HSET', KEYS[1], 'updated', ARGV[1])
finish(ARGV[1], ARGV[2])
return redis.call('HMGET', KEYS[1], unpack(JOB_COUNTS))
"""

# KEYS: 1 P:job:ID, 2 P:jobs:running.
# ARGV: 1 now, 2 retention ms, 3 origin ('' = any hub), 4 cancel ('1'|'0'),
#       5 all ('1': every target), 6.. agent ids
# Marks the parts not started as skipped ('!'), which a start can then no longer
# claim. Returns HGETALL of the job, or {} (unknown, or run by another hub).
SKIP_JOB_PARTS: Final = _JOB_FINISH + """
local f = redis.call('HMGET', KEYS[1], 'status', 'origin', 'agents')
if not f[1] then return {} end
if ARGV[3] ~= '' and f[2] ~= ARGV[3] then return {} end
if f[1] == 'RUNNING' then
  if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'cancelled', '1') end
  local agents = {}
  if ARGV[5] == '1' then
    agents = cmsgpack.unpack(f[3])
  else
    for i = 6, #ARGV do table.insert(agents, ARGV[i]) end
  end
  local skipped = 0
  for _, agent in ipairs(agents) do
    if redis.call('HGET', KEYS[1], 'p:' .. agent) == '' then
      redis.call('HSET', KEYS[1], 'p:' .. agent, '!')
      skipped = skipped + 1
    end
  end
  redis.call('HINCRBY', KEYS[1], 'n:skipped', skipped)
  redis.call('HSET', KEYS[1], 'updated', ARGV[1])
  finish(ARGV[1], ARGV[2])
end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: 1 P:jobs:running.  ARGV: 1 prefix, 2 this hub's id.
# Takes over the RUNNING jobs whose hub's alive key expired (that hub died), one
# atomic step per job, and returns the ids of every RUNNING job this hub runs.
ADOPT_JOBS: Final = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local k = ARGV[1] .. ':job:' .. id
  local f = redis.call('HMGET', k, 'status', 'origin')
  if f[1] ~= 'RUNNING' then
    redis.call('SREM', KEYS[1], id)
  elseif f[2] == ARGV[2] then
    table.insert(out, id)
  elseif redis.call('EXISTS', ARGV[1] .. ':hub:' .. f[2] .. ':alive') == 0 then
    redis.call('HSET', k, 'origin', ARGV[2])
    table.insert(out, id)
  end
end
return out
"""

SCRIPTS: Final = {
    "create_job": CREATE_JOB,
    "list_jobs": LIST_JOBS,
    "end_job_parts": END_JOB_PARTS,
    "skip_job_parts": SKIP_JOB_PARTS,
    "adopt_jobs": ADOPT_JOBS,
    "hub_alive": HUB_ALIVE,
    "reap_dead_hubs": REAP_DEAD_HUBS,
    "hub_gone": HUB_GONE,
    "hub_reset": HUB_RESET,
    "restore_agent": RESTORE_AGENT,
    "progress_check": PROGRESS_CHECK,
    "queue_frame": QUEUE_FRAME,
    "take_frames": TAKE_FRAMES,
    "create": CREATE,
    "mark_active": MARK_ACTIVE,
    "complete": COMPLETE,
    "next_in_group": NEXT_IN_GROUP,
    "list_pending": LIST_PENDING,
    "overdue": OVERDUE,
    "register_agent": REGISTER_AGENT,
    "unregister_agent": UNREGISTER_AGENT,
    "requeue_frames": REQUEUE_FRAMES,
    "list_agents": LIST_AGENTS,
    "list_commands": LIST_COMMANDS,
    "trim_history": TRIM_HISTORY,
    "touch_agents": TOUCH_AGENTS,
}
