-- Store one coalesced ack of a personal channel: acked = max(acked, offset).
--
-- KEYS[1]  the channel's receipts hash: `e` epoch, `a` acked offset, `p` reported up to
-- KEYS[2]  the channel's meta hash (`e` epoch, `o` latest offset)
-- ARGV[1]  the epoch the ack belongs to
-- ARGV[2]  the acked offset
-- ARGV[3]  ttl of the receipts hash in ms (the meta ttl)
--
-- Returns the acked offset now, or -1 when the ack was ignored: its epoch is not the
-- channel's current one (the messages it acknowledges are gone), or the channel has no
-- stored state. The offset is clamped to the channel's latest offset.
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch or epoch ~= ARGV[1] then
  return -1
end
local latest = tonumber(redis.call('HGET', KEYS[2], 'o') or '0')
local offset = math.min(tonumber(ARGV[2]), latest)
local r = redis.call('HMGET', KEYS[1], 'e', 'a')
local acked = 0
if r[1] == epoch then
  acked = tonumber(r[2] or '0')
else
  -- Receipts of an older epoch mean nothing now.
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'e', epoch)
end
if offset > acked then
  redis.call('HSET', KEYS[1], 'a', string.format('%d', offset))
  acked = offset
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return acked
