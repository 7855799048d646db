-- Claim due channels for one sweeper, atomically.
--
-- KEYS[1]  the due set (score = when due)
-- KEYS[2]  the claimed set (score = when the claim runs out), same slot
-- ARGV[1]  most channels to claim
-- ARGV[2]  visibility of a claim in ms
--
-- Returns the claimed channels. A claim that ran out (its node died or gave up) makes
-- the channel due again at once. A channel both due and claimed (published to while a
-- sweeper checks it) is left for after that claim.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local lost = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
for _, m in ipairs(lost) do
  redis.call('ZREM', KEYS[2], m)
  local s = redis.call('ZSCORE', KEYS[1], m)
  if not s or tonumber(s) > now then
    redis.call('ZADD', KEYS[1], string.format('%d', now), m)
  end
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit * 4)
local out = {}
local until_ms = string.format('%d', now + tonumber(ARGV[2]))
for _, m in ipairs(due) do
  if #out >= limit then
    break
  end
  if not redis.call('ZSCORE', KEYS[2], m) then
    redis.call('ZREM', KEYS[1], m)
    redis.call('ZADD', KEYS[2], until_ms, m)
    out[#out + 1] = m
  end
end
return out
