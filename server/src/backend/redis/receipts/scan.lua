-- The overdue, unacked, unreported messages of a personal channel.
--
-- KEYS[1]  the channel's meta hash (`e` epoch)
-- KEYS[2]  the channel's history stream (ids `<offset>-0`, fields d, t, [f])
-- KEYS[3]  the channel's receipts hash (`e` epoch, `a` acked, `p` reported)
-- ARGV[1]  the ack timeout in ms
-- ARGV[2]  most messages to return
-- ARGV[3]  history ttl in ms
--
-- Returns {epoch, next, id1, data1, from1, t1, ...}: messages after max(acked,
-- reported) published at least the timeout ago, oldest first; `next` = ms until the
-- channel must be checked again (the next pending message becomes overdue, or 0 when
-- more are overdue than returned), -1 when nothing is pending. Messages that already
-- left history (trimmed by size or age) cannot be reported. Writes nothing.
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  return {'', -1}
end
local r = redis.call('HMGET', KEYS[3], 'e', 'a', 'p')
local start = 0
if r[1] == epoch then
  start = math.max(tonumber(r[2] or '0'), tonumber(r[3] or '0'))
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local timeout = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local expired_before = now - tonumber(ARGV[3])
local overdue_from = now - timeout
local out = {epoch, -1}
local n = 0
-- Bounded: the stream holds at most `history size` entries (MAXLEN).
local entries = redis.call('XRANGE', KEYS[2], string.format('%d-0', start + 1), '+')
for _, entry in ipairs(entries) do
  local f = entry[2]
  local at = tonumber(f[4])
  if at >= expired_before then
    if at <= overdue_from then
      if n >= limit then
        out[2] = 0
        break
      end
      out[#out + 1] = entry[1]
      out[#out + 1] = f[2]
      out[#out + 1] = f[6] or ''
      out[#out + 1] = f[4]
      n = n + 1
    else
      out[2] = at + timeout - now
      break
    end
  end
end
return out
