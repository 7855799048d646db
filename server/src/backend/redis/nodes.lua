-- Live nodes of the registry; removes nodes whose heartbeat is too old.
--
-- KEYS[1]  the registry hash: field = node id, value = `<heartbeat ms>|<NodeInfo JSON>`
-- ARGV[1]  node ttl in ms
--
-- Returns the NodeInfo JSON of each live node. Stale entries are removed here, in
-- the same atomic step that judged them stale, so a node that refreshes at the same
-- moment is never removed by mistake.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl = tonumber(ARGV[1])
local all = redis.call('HGETALL', KEYS[1])
local live = {}
for i = 1, #all, 2 do
  local at, info = string.match(all[i + 1], '^(%d+)|(.*)$')
  if at and now - tonumber(at) <= ttl then
    live[#live + 1] = info
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return live
