-- Retained messages of a channel after an offset, and its current position.
--
-- KEYS[1]  the channel's meta hash (`e` epoch, `o` offset)
-- KEYS[2]  the channel's history stream (ids `<offset>-0`, fields `d` data, `t` ms)
-- ARGV[1]  a fresh random epoch, used only if the meta hash is missing
-- ARGV[2]  meta ttl in ms
-- ARGV[3]  first stream id to return: `<since + 1>-0`
-- ARGV[4]  max messages to return
-- ARGV[5]  history ttl in ms
-- ARGV[6]  '1': check the primary's replication id (Sentinel mode), '' otherwise
--
-- Returns {offset, epoch, id1, data1, id2, data2, ...}, oldest first. With a limit of 0
-- it is the position read: {offset, epoch}. Reading keeps the epoch alive for another
-- meta ttl, so an idle channel with subscribers keeps its epoch.
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
-- Sentinel mode: a channel last written under another replication id starts a new
-- epoch, exactly as in publish.lua (see keys.rs).
local replid = ARGV[6] == '1' and string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or nil
if replid and epoch and redis.call('HGET', meta, 'r') ~= replid then
  epoch = nil
end
local offset = 0
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 'o', 0)
else
  offset = tonumber(redis.call('HGET', meta, 'o') or '0')
end
if replid and redis.call('EXISTS', meta) == 1 then
  redis.call('HSET', meta, 'r', replid)
end
redis.call('PEXPIRE', meta, ARGV[2])
local out = {offset, epoch}
local limit = tonumber(ARGV[4])
if limit <= 0 then
  return out
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local cutoff = now - tonumber(ARGV[5])
-- The stream holds at most `history size` entries (MAXLEN), so this read is bounded.
local entries = redis.call('XRANGE', stream, ARGV[3], '+')
local n = 0
for _, entry in ipairs(entries) do
  if tonumber(entry[2][4]) < cutoff then
    -- Expired: it and everything before it are no longer history.
    out = {offset, epoch}
    n = 0
  elseif n < limit then
    out[#out + 1] = entry[1]
    out[#out + 1] = entry[2][2]
    n = n + 1
  else
    break
  end
end
return out
