-- A personal channel's acknowledged position.
--
-- KEYS[1]  the channel's receipts hash (`e` epoch, `a` acked offset)
-- KEYS[2]  the channel's meta hash (`e` epoch)
--
-- Returns {epoch, acked}: the channel's current epoch ('' without stored state) and the
-- acked offset in it (0 when the stored ack belongs to another epoch). Writes nothing.
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  return {'', 0}
end
local r = redis.call('HMGET', KEYS[1], 'e', 'a')
if r[1] == epoch then
  return {epoch, tonumber(r[2] or '0')}
end
return {epoch, 0}
