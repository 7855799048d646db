-- Webhook presence and the event log (see broker/webhook.rs for the model).
--
-- Every key starts with W = `<prefix>{#webhook}:` (one cluster slot):
--   W..'meta'      hash: epoch, n (the last event number; a new log starts at ms x 1000)
--   W..'log'       stream: id `<n>-0`, field e = the event's JSON
--   W..'on'        set: subjects announced online / occupied
--   W..'due'       zset: subject -> offline deadline (ms, Redis clock)
--   W..'nodes'     hash: node -> last report (ms, Redis clock)
--   W..'n:'..node  set: subjects the node holds
--   W..'d:'..gen   set: subjects of a dead or leaving node not let go of yet, one per drop
--   W..'dropping'  hash: gen -> node, the drops in progress
--   W..'dgen'      counter numbering the drops
--   W..'s:'..subj  set: nodes holding the subject
-- Keys other than KEYS[1..3] are built here from W: they share its hash tag, so they
-- live in the same slot (and on the same shard).
--
-- KEYS[1] W..'meta'  KEYS[2] W..'log'  KEYS[3] W..'nodes'
-- ARGV[1] op: report | leave | sweep | append
-- ARGV[2] W
-- ARGV[3] an epoch to use if the log has none yet
-- ARGV[4] grace ms
-- ARGV[5] retention (events, approximate)
-- report: ARGV[6] node, then pairs (subject, '1' held | '0' not held)
--         returns 1 if the node was unknown (it must report all its holdings again)
-- leave:  ARGV[6] node, ARGV[7] max subjects let go of in this call
-- sweep:  ARGV[6] node ttl ms, ARGV[7] max offline events per call, ARGV[8] max subjects
--         of dead nodes let go of per call; returns events emitted
-- append: ARGV[6] type, ARGV[7] field (user | channel), ARGV[8] name, ARGV[9] extra JSON members,
--         ARGV[10] the event's id ('' = `<epoch>-<n>`)
local op, W = ARGV[1], ARGV[2]
local grace, retention = tonumber(ARGV[4]), ARGV[5]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nowtext = string.format('%d', now)

local function emit(kind, field, name, extra, id)
  local epoch = redis.call('HGET', KEYS[1], 'epoch')
  if not epoch then
    epoch = ARGV[3]
    redis.call('HSET', KEYS[1], 'epoch', epoch)
  end
  -- A new log numbers from the clock (ms x 1000), not from 1: a log that Redis lost
  -- and started again still gives every user a larger seq than before (below 2^53,
  -- so exact in Lua and in JavaScript).
  redis.call('HSETNX', KEYS[1], 'n', string.format('%d', now * 1000))
  local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
  local ntext = string.format('%d', n)
  if not id or id == '' then id = epoch .. '-' .. ntext end
  local json = '{"id":' .. cjson.encode(id) .. ',"type":' .. cjson.encode(kind) ..
    ',"' .. field .. '":' .. cjson.encode(name) .. ',"seq":' .. ntext .. ',"at":' .. nowtext
  if extra and extra ~= '' then json = json .. ',' .. extra end
  json = json .. '}'
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', retention, ntext .. '-0', 'e', json)
end

local function transition(subject, up)
  local kind, name = string.match(subject, '^(.):(.*)$')
  if kind == 'u' then
    emit(up and 'user.online' or 'user.offline', 'user', name)
  elseif kind == 'c' then
    emit(up and 'channel.occupied' or 'channel.vacated', 'channel', name)
  end
end

-- Node `node` no longer holds `subject`; the last holder starts the grace.
local function let_go(node, subject)
  redis.call('SREM', W .. 's:' .. subject, node)
  redis.call('SREM', W .. 'n:' .. node, subject)
  if redis.call('SCARD', W .. 's:' .. subject) == 0 and redis.call('SISMEMBER', W .. 'on', subject) == 1 then
    if grace <= 0 then
      redis.call('ZREM', W .. 'due', subject)
      redis.call('SREM', W .. 'on', subject)
      transition(subject, false)
    else
      redis.call('ZADD', W .. 'due', 'NX', now + grace, subject)
    end
  end
end

-- A dead or leaving node is dropped in bounded steps: a node with 20,000 users would
-- otherwise hold Redis (this whole slot) for tens of ms in one call. Its holdings move
-- to W..'d:'..node and the node leaves W..'nodes' at once, so a node restarted under
-- the same id is "unknown" and reports everything it holds again (into a fresh
-- W..'n:' set); then each call lets go of a bounded number of the old holdings,
-- skipping those the node holds again.
-- Each drop gets a set of its own (a RENAME, O(1)), so a node that dies again while an
-- earlier drop of it is still running never merges sets in one call.
local function start_drop(node)
  local held = W .. 'n:' .. node
  if redis.call('EXISTS', held) == 1 then
    local gen = string.format('%d', redis.call('INCR', W .. 'dgen'))
    redis.call('RENAME', held, W .. 'd:' .. gen)
    redis.call('HSET', W .. 'dropping', gen, node)
  end
  redis.call('HDEL', KEYS[3], node)
end

-- Lets go of up to `budget` old holdings of dropped nodes; returns how many.
local function continue_drops(budget)
  local done = 0
  local drops = redis.call('HGETALL', W .. 'dropping')
  for i = 1, #drops, 2 do
    if done >= budget then
      break
    end
    local gen, node = drops[i], drops[i + 1]
    local gone = W .. 'd:' .. gen
    local items = redis.call('SPOP', gone, budget - done)
    for _, subject in ipairs(items) do
      if redis.call('SISMEMBER', W .. 'n:' .. node, subject) == 0 then
        let_go(node, subject)
      end
    end
    done = done + #items
    if redis.call('EXISTS', gone) == 0 then
      redis.call('HDEL', W .. 'dropping', gen)
    end
  end
  return done
end

if op == 'report' then
  local node = ARGV[6]
  local fresh = redis.call('HSET', KEYS[3], node, nowtext)
  for i = 7, #ARGV, 2 do
    local subject = ARGV[i]
    if ARGV[i + 1] == '1' then
      redis.call('SADD', W .. 's:' .. subject, node)
      redis.call('SADD', W .. 'n:' .. node, subject)
      if redis.call('SADD', W .. 'on', subject) == 1 then
        transition(subject, true)
      else
        -- Back within the grace (a hop or a quick reconnect): no event.
        redis.call('ZREM', W .. 'due', subject)
      end
    else
      let_go(node, subject)
    end
  end
  return fresh
elseif op == 'leave' then
  start_drop(ARGV[6])
  continue_drops(tonumber(ARGV[7]))
  return 1
elseif op == 'sweep' then
  local ttl = tonumber(ARGV[6])
  local nodes = redis.call('HGETALL', KEYS[3])
  for i = 1, #nodes, 2 do
    if now - tonumber(nodes[i + 1]) > ttl then
      start_drop(nodes[i])
    end
  end
  continue_drops(tonumber(ARGV[8]))
  local due = redis.call('ZRANGEBYSCORE', W .. 'due', '-inf', now, 'LIMIT', 0, tonumber(ARGV[7]))
  local emitted = 0
  for _, subject in ipairs(due) do
    redis.call('ZREM', W .. 'due', subject)
    if redis.call('SCARD', W .. 's:' .. subject) == 0 and redis.call('SREM', W .. 'on', subject) == 1 then
      transition(subject, false)
      emitted = emitted + 1
    end
  end
  return emitted
elseif op == 'append' then
  emit(ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
  return 1
end
return redis.error_reply('unknown op ' .. tostring(op))
