-- Publish one message to a channel, atomically.
--
-- KEYS[1]  the channel's meta hash: field `e` = epoch, field `o` = last offset
-- KEYS[2]  the channel's history stream: entry id `<offset>-0`, fields `d` = data, `t` = ms
-- ARGV[1]  the pub/sub channel to publish on (same hash slot as the keys)
-- ARGV[2]  the data (JSON text)
-- ARGV[3]  a fresh random epoch, used only if the meta hash is missing (history lost)
-- ARGV[4]  history size (max entries kept)
-- ARGV[5]  history ttl in ms
-- ARGV[6]  meta ttl in ms
-- ARGV[7]  'PUBLISH' or 'SPUBLISH'
-- ARGV[8]  the publisher's user id, or '' when none (stored as field `f`)
-- ARGV[9]  '1': check the primary's replication id (Sentinel mode), '' otherwise
--
-- Returns {offset, epoch}. Publishes `<offset>:<epoch>:<data>`, or
-- `<offset>:<epoch>:<from>:<data>` with a publisher (see keys.rs for the parse).
--
-- This is the only script that creates a channel's keys.
--
-- Time comes from the Redis server (TIME), so every node judges a channel's
-- history age by the same clock.
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
-- Sentinel mode: a channel last written under another replication id (field `r`) was
-- written on a primary that is gone; this Redis may lack its last writes, so offsets
-- seen by clients could be handed out again. Start a new epoch (see keys.rs).
local replid = ARGV[9] == '1' and string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or nil
if replid and epoch and redis.call('HGET', meta, 'r') ~= replid then
  epoch = nil
end
if not epoch then
  -- The channel is new or its metadata was lost: start a new epoch, and drop any
  -- history left from the old one (its ids would collide with the new offsets).
  epoch = ARGV[3]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 'o', 0)
end
local offset = redis.call('HINCRBY', meta, 'o', 1)
local size = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
if size > 0 and ttl > 0 then
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  if ARGV[8] == '' then
    redis.call('XADD', stream, 'MAXLEN', size, string.format('%d-0', offset),
      'd', ARGV[2], 't', string.format('%d', now))
  else
    redis.call('XADD', stream, 'MAXLEN', size, string.format('%d-0', offset),
      'd', ARGV[2], 't', string.format('%d', now), 'f', ARGV[8])
  end
  -- Age trim: entries are in time order, so expired ones form a prefix. Look at the
  -- head first (the common case: nothing expired, one entry read); when it has
  -- expired, look at a few more, so that each publish removes more than it adds and
  -- the stream keeps up. Readers also skip expired entries, so this only saves memory.
  local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if head[1] and tonumber(head[1][2][4]) < now - ttl then
    head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 16)
  else
    head = {}
  end
  local last = nil
  for _, entry in ipairs(head) do
    if tonumber(entry[2][4]) < now - ttl then
      last = entry[1]
    else
      break
    end
  end
  if last then
    -- ids are `<offset>-0`, so MINID `<offset>-1` drops everything up to `last`.
    local o = string.match(last, '^(%d+)')
    redis.call('XTRIM', stream, 'MINID', o .. '-1')
  end
  redis.call('PEXPIRE', stream, ttl)
else
  redis.call('DEL', stream)
end
if replid then
  redis.call('HSET', meta, 'r', replid)
end
redis.call('PEXPIRE', meta, ARGV[6])
local payload
if ARGV[8] == '' then
  payload = string.format('%d', offset) .. ':' .. epoch .. ':' .. ARGV[2]
else
  payload = string.format('%d', offset) .. ':' .. epoch .. ':' .. ARGV[8] .. ':' .. ARGV[2]
end
redis.call(ARGV[7], ARGV[1], payload)
return {offset, epoch}
