-- Retained messages of a channel after an offset, and its current position.
--
-- KEYS[1]  the channel's meta hash (`e` epoch, `o` offset)
-- KEYS[2]  the channel's history stream (ids `<offset>-0`, fields `d` data, `t` ms,
--          and `f` publisher when known)
-- ARGV[1]  meta ttl in ms
-- ARGV[2]  first stream id to return: `<since + 1>-0`
-- ARGV[3]  max messages to return
-- ARGV[4]  history ttl in ms
-- ARGV[5]  '1': check the primary's replication id (Sentinel mode), '' otherwise
-- ARGV[6]  history size: only the last this many offsets are history (publish.lua
--          trims in steps, so the stream may hold a few more); absent: no cap
--
-- Returns {offset, epoch, id1, data1, from1, id2, data2, from2, ...}, oldest first, with
-- from = '' when the message has no publisher (user ids are never empty). With a limit
-- of 0 it is the position read: {offset, epoch}.
--
-- A channel without a meta hash (never published to, expired, or lost with a Redis
-- restart) reads as {0, ''} and the read writes nothing: only a publish creates a
-- channel's keys, so subscribing to endless new names leaves nothing behind. Reading an
-- existing channel keeps its epoch alive for another meta ttl, so an idle channel with
-- subscribers keeps its epoch.
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  return {0, ''}
end
-- Sentinel mode: a channel last written under another replication id may have lost
-- writes in a failover (see keys.rs). Its stream is treated as lost: the keys go, the
-- read answers the empty position, and the next publish starts a new epoch, exactly as
-- publish.lua does when it sees the mismatch.
if ARGV[5] == '1' then
  local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
  if replid and redis.call('HGET', meta, 'r') ~= replid then
    redis.call('DEL', meta, stream)
    return {0, ''}
  end
end
local offset = tonumber(redis.call('HGET', meta, 'o') or '0')
-- GT: a read only lengthens the TTL, never shortens one that publish.lua set with its
-- slack (see there), so the meta hash still lives its TTL after the last publish.
redis.call('PEXPIRE', meta, ARGV[1], 'GT')
local out = {offset, epoch}
local limit = tonumber(ARGV[3])
if limit <= 0 then
  return out
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local cutoff = now - tonumber(ARGV[4])
-- History is the last `size` offsets: start there when `since` is older. The stream
-- holds at most `size` + 15 entries (publish.lua trims every 16th offset), so this
-- read is bounded.
local start = ARGV[2]
local size = tonumber(ARGV[6] or '')
if size then
  local floor = offset - size + 1
  if floor > tonumber(string.match(start, '^(%d+)')) then
    start = string.format('%d', floor) .. '-0'
  end
end
local entries = redis.call('XRANGE', stream, start, '+')
local n = 0
for _, entry in ipairs(entries) do
  local fields = entry[2]
  if tonumber(fields[4]) < cutoff then
    -- Expired: it and everything before it are no longer history.
    out = {offset, epoch}
    n = 0
  elseif n < limit then
    out[#out + 1] = entry[1]
    out[#out + 1] = fields[2]
    -- Fields are written in a fixed order: d, t, then f when there is a publisher.
    out[#out + 1] = fields[6] or ''
    n = n + 1
  else
    break
  end
end
return out
