-- Delivery of the webhook log to one target (a URL): its lease and its cursor.
--
-- KEYS[1] W..'lease:'..target  (string: the holder's id; expires)
-- KEYS[2] W..'cursor'          (hash: target -> the last event number it acknowledged)
-- KEYS[3] W..'log'             (stream: id `<n>-0`, field e)
-- ARGV[1] op: claim | read | ack | release
-- ARGV[2] target  ARGV[3] holder  ARGV[4] lease ms
-- read: ARGV[5] max events. Returns {} when another node holds the lease, else
--       {trimmed, n1, json1, n2, json2, ...}
-- ack:  ARGV[5] the last event number delivered
-- claim / ack return 1 when `holder` holds the lease, else 0.
local op, target, holder, lease = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local function take()
  local cur = redis.call('GET', KEYS[1])
  if cur and cur ~= holder then return false end
  redis.call('SET', KEYS[1], holder, 'PX', lease)
  return true
end

if op == 'claim' then
  return take() and 1 or 0
elseif op == 'read' then
  if not take() then return {} end
  local cursor = redis.call('HGET', KEYS[2], target)
  local after = tonumber(cursor or '0')
  local entries = redis.call('XRANGE', KEYS[3], string.format('%d', after + 1) .. '-0', '+', 'COUNT', tonumber(ARGV[5]))
  local out = {0}
  for i, entry in ipairs(entries) do
    local n = tonumber(string.match(entry[1], '^(%d+)-'))
    if i == 1 and cursor and n > after + 1 then out[1] = n - after - 1 end
    local fields = entry[2]
    for j = 1, #fields, 2 do
      if fields[j] == 'e' then
        out[#out + 1] = string.format('%d', n)
        out[#out + 1] = fields[j + 1]
      end
    end
  end
  return out
elseif op == 'ack' then
  if redis.call('GET', KEYS[1]) ~= holder then return 0 end
  local cur = tonumber(redis.call('HGET', KEYS[2], target) or '0')
  local upto = tonumber(ARGV[5])
  if upto > cur then redis.call('HSET', KEYS[2], target, string.format('%d', upto)) end
  return 1
elseif op == 'release' then
  if redis.call('GET', KEYS[1]) == holder then redis.call('DEL', KEYS[1]) end
  return 1
end
return redis.error_reply('unknown op ' .. tostring(op))
