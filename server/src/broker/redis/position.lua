-- A channel's current position, creating its epoch if the channel is new.
--
-- KEYS[1]  the channel's meta hash (`e` epoch, `o` offset)
-- KEYS[2]  the channel's history stream
-- ARGV[1]  a fresh random epoch, used only if the meta hash is missing
-- ARGV[2]  meta ttl in ms
--
-- Returns {offset, epoch}. Reading a position keeps the epoch alive for another
-- meta ttl, so an idle channel with subscribers keeps its epoch.
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
local offset = 0
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 'o', 0)
else
  offset = tonumber(redis.call('HGET', meta, 'o') or '0')
end
redis.call('PEXPIRE', meta, ARGV[2])
return {offset, epoch}
