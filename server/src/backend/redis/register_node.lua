-- Add or refresh a node in the registry.
--
-- KEYS[1]  the registry hash: field = node id, value = `<heartbeat ms>|<NodeInfo JSON>`
-- ARGV[1]  node id
-- ARGV[2]  NodeInfo JSON
-- ARGV[3]  ms after which the whole registry expires if no node refreshes it
--
-- The heartbeat time is the Redis server's (TIME): one clock for every node.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', now) .. '|' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
