-- Schedule a personal channel for the unacked check (before a publish to it).
--
-- KEYS[1]  the due set (score = when, Redis clock ms)
-- ARGV[1]  the channel
-- ARGV[2]  delay in ms (the ack timeout)
--
-- An entry already due earlier is kept: the sweeper reschedules the channel itself
-- when newer messages are still pending after a check.
--
-- Returns how many ms until the entry is due: until then it stays in the set (the
-- sweeper claims only due entries), so the node may skip scheduling the channel again.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local at = now + tonumber(ARGV[2])
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s or tonumber(s) > at then
  redis.call('ZADD', KEYS[1], string.format('%d', at), ARGV[1])
  return at - now
end
return math.max(0, tonumber(s) - now)
