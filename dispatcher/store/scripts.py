"""Lua scripts of the Redis engine: each state change that belongs together, atomically.

Key layout (docs/redis.md, binding), with ``P`` the prefix:
``P:cmd:ID`` hash, ``P:agent:ID:pending`` zset (score ts), ``P:deadlines`` zset
(score deadline; the sweepers' index), ``P:agent:ID`` hash, ``P:agents`` set,
``P:agent:ID:events`` list (frames queued for an agent that is away) and
``P:queues`` zset (the agent ids that have such a list, score: last push ms;
the bound of their number, docs/redis.md).

Scripts that walk an agent's pending index build the ``P:cmd:ID`` key names
they touch from the prefix (ARGV[1]); that is fine on a single Redis or a
Sentinel-managed primary, not on Redis Cluster (which this hub does not use).
Every script returns plain arrays; ``redis.py`` turns them into records.
"""

from __future__ import annotations

from typing import Final

__all__ = ["SCRIPTS"]

# KEYS: 1 P:cmd:ID, 2 P:agent:AGENT:pending, 3 P:deadlines
# ARGV: 1 prefix, 2 id, 3 agent, 4 key, 5 group ('' = none), 6 ts, 7 deadline ('' = none),
#       8 origin, 9 payload (msgpack), 10 drop ('' | '*' | 'k:<command key>'),
#       11 max_pending (0 = no limit), 12 retention ms, 13 dropped result (msgpack),
#       14 locate ('1': look up the agent's hub; '0' returns '' as location)
# Returns {0, HGETALL} when the id exists (idempotent submit; a hub other than the
# command's origin that submits it again while it is not COMPLETE is added to its
# 'watchers' field, so it is told of the completion too), {-1} over the
# limit, else {1, coalesced, {{id, key, group, origin, ts}...dropped}, location} with
# location the hub the agent is connected to ('' if none).
CREATE: Final = """
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
    local f = redis.call('HMGET', ok, 'status', 'group', 'key', 'origin', 'ts')
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
        table.insert(dropped, {other, f[3], f[2], f[4], f[5]})
      elseif group ~= '' and f[2] == group then
        coalesced = 1
      end
    end
  end
end
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'agent', ARGV[3], 'key', ARGV[4],
           'status', 'PENDING', 'outcome', '', 'group', group, 'ts', ARGV[6],
           'updated', ARGV[6], 'deadline', ARGV[7], 'origin', ARGV[8], 'payload', ARGV[9])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[2])
if ARGV[7] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[7], ARGV[2])
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
# Returns {1, agent, key, group, origin, ts, deadline, {{id, key, origin, ts}...members},
# watchers}, or {0} unknown, {-1} other agent's, {-2} already COMPLETE, {-3} past its
# deadline. ``watchers``: the other hubs waiting on it (comma-separated, see CREATE).
COMPLETE: Final = """
local f = redis.call('HMGET', KEYS[1], 'status', 'agent', 'key', 'group', 'origin', 'ts',
                     'deadline', 'id', 'watchers')
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
redis.call('ZREM', pending, f[8])
redis.call('ZREM', KEYS[2], f[8])
local members = {}
if answer and f[4] and f[4] ~= '' then
  for _, id in ipairs(redis.call('ZRANGE', pending, 0, -1)) do
    local k = ARGV[1] .. ':cmd:' .. id
    local m = redis.call('HMGET', k, 'status', 'group', 'key', 'origin', 'ts', 'deadline')
    if m[1] == 'PENDING' and m[2] == f[4]
        and not (m[6] and m[6] ~= '' and tonumber(m[6]) <= now) then
      redis.call('HSET', k, 'status', 'COMPLETE', 'outcome', ARGV[2], 'updated', ARGV[3],
                 'result', ARGV[4], 'error', ARGV[5])
      redis.call('PEXPIRE', k, ARGV[7])
      redis.call('ZREM', pending, id)
      redis.call('ZREM', KEYS[2], id)
      table.insert(members, {id, m[3], m[4], m[5]})
    end
  end
end
return {1, f[2], f[3], f[4], f[5], f[6], f[7], members, f[9] or ''}
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

SCRIPTS: Final = {
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
}
