-- Record a revocation of one user's tokens.
--
-- KEYS[1]  the revocations hash: field = user, value = `<before>|<until>` (unix seconds)
-- ARGV[1]  user
-- ARGV[2]  before: tokens issued earlier are refused
-- ARGV[3]  until: when the revocation ends (every token it refuses has expired by then)
-- ARGV[4]  ms until `until`: the hash lives as long as its longest revocation
--
-- A later `before` and a later `until` win over what is stored, so two revocations
-- never shorten each other.
local before = tonumber(ARGV[2])
local untl = tonumber(ARGV[3])
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local b, u = string.match(old, '^(%d+)|(%d+)$')
  if b then
    before = math.max(before, tonumber(b))
    untl = math.max(untl, tonumber(u))
  end
end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d|%d', before, untl))
local ttl = redis.call('PTTL', KEYS[1])
if ttl >= 0 and ttl < tonumber(ARGV[4]) or ttl == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
