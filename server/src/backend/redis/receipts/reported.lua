-- Mark a personal channel's messages reported (unacked) up to an offset.
--
-- KEYS[1]  the channel's receipts hash (`e` epoch, `a` acked, `p` reported)
-- KEYS[2]  the channel's meta hash (`e` epoch)
-- ARGV[1]  the epoch of the report
-- ARGV[2]  reported up to this offset
-- ARGV[3]  ttl of the receipts hash in ms (the meta ttl)
--
-- Nothing happens when the channel is in another epoch now.
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch or epoch ~= ARGV[1] then
  return 0
end
local r = redis.call('HMGET', KEYS[1], 'e', 'p')
if r[1] ~= epoch then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'e', epoch, 'p', ARGV[2])
elseif tonumber(r[2] or '0') < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'p', ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
