-- Publish a batch of messages, to one or more channels, atomically.
--
-- Every channel of a call lives in one cluster slot (the node groups them so); with one
-- Redis every channel shares the one "slot". Several channels in one call is what lets
-- concurrent publishes share one script call (see coalesce.rs).
--
-- KEYS[2g-1]  channel g's meta hash: field `e` = epoch, `o` = last offset, `r` = replid,
--             `x` = when this script last refreshed both keys' TTLs (Redis ms)
-- KEYS[2g]    channel g's history stream: entry id `<offset>-0`, fields `d` = data,
--             `t` = ms, `f` = publisher (when known)
-- ARGV[1]  history size (max entries kept)
-- ARGV[2]  history ttl in ms
-- ARGV[3]  meta ttl in ms
-- ARGV[4]  'PUBLISH' or 'SPUBLISH'
-- ARGV[5]  '1': check the primary's replication id (Sentinel mode), '' otherwise
-- ARGV[6]  a fresh random epoch, used only for a channel whose meta hash is missing
-- then, for each channel g in KEYS order:
--   the pub/sub channel, the message count n, then n pairs (publisher or '', data)
--
-- Returns {first offset of channel 1, its epoch, first offset of channel 2, ...}: the
-- n messages of a channel got offsets first .. first + n - 1, in ARGV order. Publishes
-- each message as `<offset>:<epoch>:<data>`, or `<offset>:<epoch>:<from>:<data>` with
-- a publisher (see keys.rs for the parse): the same keys, fields and payloads as the
-- one-message script of earlier versions, so nodes of both versions run side by side.
--
-- This is the only script that creates a channel's keys.
--
-- Per call: TIME (and INFO in Sentinel mode) once. Per channel: HMGET and HSET; every
-- 16th offset a look at the head of the stream for expired entries and one XTRIM (by
-- count and age); and once per eighth of the shorter TTL the two PEXPIREs. Per
-- message: XADD and PUBLISH. Each redis.call costs about 2 µs of Redis CPU on the
-- benchmark machine whatever it does, so the count of calls per message is the cost.
--
-- TTLs, amortised: a key's TTL is refreshed only when `every` ms have passed since the
-- last refresh (field `x`), and then set to its TTL plus `every`. So a key still
-- expires no sooner than its TTL after its last publish (x + ttl + every > last publish
-- + ttl), and at most `every` later than it did with a refresh per publish. Nodes of
-- earlier versions refresh at every publish and ignore `x`; both run side by side.
--
-- Time comes from the Redis server (TIME), so every node judges a channel's
-- history age by the same clock.
local size = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local command = ARGV[4]
-- Sentinel mode: a channel last written under another replication id (field `r`) was
-- written on a primary that is gone; this Redis may lack its last writes, so offsets
-- seen by clients could be handed out again. Start a new epoch (see keys.rs).
local replid = ARGV[5] == '1' and string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or nil
local fresh = ARGV[6]
local keep = size > 0 and ttl > 0
local metattl = tonumber(ARGV[3])
local every = math.floor((keep and math.min(ttl, metattl) or metattl) / 8)
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local nowtext = string.format('%d', now)
local out = {}
local a = 7
for g = 1, #KEYS / 2 do
  local meta, stream = KEYS[2 * g - 1], KEYS[2 * g]
  local pubsub, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local m = redis.call('HMGET', meta, 'e', 'o', 'r', 'x')
  local epoch, offset = m[1], tonumber(m[2]) or 0
  if replid and epoch and m[3] ~= replid then
    epoch = false
  end
  local new = not epoch
  if new then
    -- The channel is new or its metadata was lost: start a new epoch, and drop any
    -- history left from the old one (its ids would collide with the new offsets).
    epoch = fresh
    offset = 0
    redis.call('DEL', stream)
  end
  -- Clock steps back (a failover to a replica with another clock) refresh too.
  local refreshed = tonumber(m[4])
  local refresh = new or not refreshed or now - refreshed >= every or now < refreshed
  local first = offset + 1
  for i = 1, n do
    local from, data = ARGV[a], ARGV[a + 1]
    a = a + 2
    offset = offset + 1
    local id = string.format('%d', offset)
    if keep then
      -- Fields in a fixed order (d, t, then f), which history.lua relies on. No MAXLEN
      -- here: an exact trim at every XADD costs about twice the XADD; see below.
      if from == '' then
        redis.call('XADD', stream, id .. '-0', 'd', data, 't', nowtext)
      else
        redis.call('XADD', stream, id .. '-0', 'd', data, 't', nowtext, 'f', from)
      end
    end
    if from == '' then
      redis.call(command, pubsub, id .. ':' .. epoch .. ':' .. data)
    else
      redis.call(command, pubsub, id .. ':' .. epoch .. ':' .. from .. ':' .. data)
    end
  end
  if keep then
    -- Trims, amortised: only when this call passed a multiple of 16 offsets, so the
    -- stream holds at most `size` + 15 entries between calls (plus the messages of the
    -- call itself). history.lua never returns more than the last `size` offsets, so
    -- what clients see is exactly `size` messages.
    if math.floor(offset / 16) ~= math.floor((first - 1) / 16) then
      -- By count: keep offsets above offset - size.
      local minid = offset - size + 1
      -- By age: entries are in time order, so expired ones form a prefix. Look at the
      -- head first (the common case: nothing expired, one entry read); when it has
      -- expired, look at up to 32, so that each trim removes more than the 16
      -- publishes since the last one add and the stream keeps up. Readers skip expired
      -- entries and the stream's TTL bounds it anyway, so this only saves memory sooner.
      if not new then
        local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
        if head[1] and tonumber(head[1][2][4]) < now - ttl then
          head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 32)
        else
          head = {}
        end
        for _, entry in ipairs(head) do
          if tonumber(entry[2][4]) < now - ttl then
            -- ids are `<offset>-0`: everything up to this one goes.
            local o = tonumber(string.match(entry[1], '^(%d+)')) + 1
            if o > minid then
              minid = o
            end
          else
            break
          end
        end
      end
      if minid > 1 then
        redis.call('XTRIM', stream, 'MINID', string.format('%d', minid) .. '-0')
      end
    end
    if refresh then
      redis.call('PEXPIRE', stream, ttl + every)
    end
  elseif new then
    redis.call('DEL', stream)
  end
  -- One HSET with whatever changed: the offset always, the epoch when new, the
  -- replication id in Sentinel mode, the refresh time when refreshing.
  local fields = {'o', string.format('%d', offset)}
  if new then
    fields[#fields + 1] = 'e'
    fields[#fields + 1] = epoch
  end
  if replid then
    fields[#fields + 1] = 'r'
    fields[#fields + 1] = replid
  end
  if refresh then
    fields[#fields + 1] = 'x'
    fields[#fields + 1] = nowtext
  end
  redis.call('HSET', meta, unpack(fields))
  if refresh then
    redis.call('PEXPIRE', meta, metattl + every)
  end
  out[#out + 1] = first
  out[#out + 1] = epoch
end
return out
