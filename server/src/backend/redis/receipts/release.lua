-- Release a sweeper's claim on a channel, and schedule the channel again if needed.
--
-- KEYS[1]  the due set
-- KEYS[2]  the claimed set, same slot
-- ARGV[1]  the channel
-- ARGV[2]  ms until the channel must be checked again, or -1 for never
--
-- An entry added meanwhile by a publish is kept if it is due earlier.
redis.call('ZREM', KEYS[2], ARGV[1])
local next = tonumber(ARGV[2])
if next >= 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local at = now + next
  local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if not s or tonumber(s) > at then
    redis.call('ZADD', KEYS[1], string.format('%d', at), ARGV[1])
  end
end
return 1
