-- Apply one node's presence changes in one channel.
--
-- KEYS[1]  the channel's presence hash: field `<node>|<user>` = connections
-- ARGV[1]  presence ttl in ms
-- ARGV[2..] pairs of (field, connections); 0 connections removes the field
local key = KEYS[1]
for i = 2, #ARGV, 2 do
  if ARGV[i + 1] == '0' then
    redis.call('HDEL', key, ARGV[i])
  else
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  end
end
if redis.call('EXISTS', key) == 1 then
  redis.call('PEXPIRE', key, ARGV[1])
end
return 1
