"""Lua for RedisLimitStore. Each admission and each settlement is ONE script, so Redis runs it atomically.

Time is Redis server time in integer microseconds (`TIME`), unless a test injects `now`: replicas with
skewed clocks agree, and integer µs scores compare exactly (no float formatting in the sorted sets).

Keys per scope S under prefix P:
  P s:S:log   sorted set  request_id -> admission time (µs); the sliding window log
  P s:S:tok   hash        request_id -> tokens charged; field "" holds the window total
  P s:S:day   hash        d -> UTC day number, t -> tokens charged that day
  P s:S:conc  sorted set  request_id -> lease deadline (µs); members past their deadline are reclaimed
  P r:ID      hash        the reservation: t (tokens), ts, d (day), s (JSON list of scope names)
Every key carries a TTL (window, lease, next UTC midnight) so idle scopes vanish by themselves.
"""

from __future__ import annotations

_COMMON = r"""
local DAY = 86400000000
local function clock(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function num(x) return string.format('%.0f', x) end
local function extend(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
-- Drop log entries with ts <= horizon and take their tokens off the window total.
local function trim(log, tok, horizon)
  local old = redis.call('ZRANGEBYSCORE', log, '-inf', num(horizon))
  local n = #old
  if n == 0 then return end
  local freed = 0
  for i = 1, n, 500 do
    local chunk = {}
    for j = i, math.min(i + 499, n) do chunk[#chunk + 1] = old[j] end
    local vals = redis.call('HMGET', tok, unpack(chunk))
    for j = 1, #vals do freed = freed + (tonumber(vals[j]) or 0) end
    redis.call('HDEL', tok, unpack(chunk))
    redis.call('ZREM', log, unpack(chunk))
  end
  if redis.call('ZCARD', log) == 0 then
    redis.call('DEL', log, tok)
  elseif freed > 0 then
    redis.call('HINCRBY', tok, '', num(-freed))
  end
end
local function newest_reset(log, now, W)
  local e = redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')
  if #e == 0 then return 0 end
  return tonumber(e[2]) + W - now
end
"""

# KEYS: [reservation, then log, tok, day, conc per scope]
# ARGV: request_id, tokens, now_us or '', window_us, lease_us, limits ("rpm,tpm,tpd,conc" for every scope, joined
#       by commas; -1 = unlimited), JSON list of scope names (stored in the reservation for settle).
# Returns one comma-joined string (one bulk reply parses far faster than a long array):
#   status (0 refused, 1 admitted, 2 already admitted), nfail, (scope_index, code 1..4, wait_us or -1, never 0/1)
#   * nfail, then (requests, tokens, tokens_today, in_flight, reset_us) per scope.
ADMIT = (
    _COMMON
    + r"""
local rid = ARGV[1]
local tokens = tonumber(ARGV[2])
local now = clock(ARGV[3])
local W = tonumber(ARGV[4])
local lease = tonumber(ARGV[5])
local n = (#KEYS - 1) / 4
local lim = {}
for v in string.gmatch(ARGV[6], '[^,]+') do lim[#lim + 1] = tonumber(v) end
local today = math.floor(now / DAY)
local day_left = (today + 1) * DAY - now
local dup = redis.call('EXISTS', KEYS[1]) == 1
local failures, states = {}, {}
local function fail(i, code, wait, never)
  failures[#failures + 1] = i .. ',' .. code .. ',' .. num(wait) .. ',' .. never
end
for i = 1, n do
  local k, a = 1 + (i - 1) * 4, (i - 1) * 4
  local log, tok, day, conc = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local rpm, tpm, tpd, cc = lim[a + 1], lim[a + 2], lim[a + 3], lim[a + 4]
  trim(log, tok, now - W)
  redis.call('ZREMRANGEBYSCORE', conc, '-inf', num(now))
  local count = redis.call('ZCARD', log)
  local used = tonumber(redis.call('HGET', tok, '')) or 0
  local dd = redis.call('HMGET', day, 'd', 't')
  local day_used = 0
  if tonumber(dd[1]) == today then day_used = tonumber(dd[2]) or 0 end
  local inflight = redis.call('ZCARD', conc)
  states[i] = {count, used, day_used, inflight}
  if not dup then
    if rpm == 0 then
      fail(i, 1, -1, 1)
    elseif rpm > 0 and count + 1 > rpm then
      local e = redis.call('ZRANGE', log, count - rpm, count - rpm, 'WITHSCORES')
      fail(i, 1, tonumber(e[2]) + W - now, 0)
    end
    if tpm >= 0 and tokens > tpm then
      fail(i, 2, -1, 1)
    elseif tpm >= 0 and used + tokens > tpm then
      local need, freed, wait, start = used + tokens - tpm, 0, W, 0
      while true do
        local batch = redis.call('ZRANGE', log, start, start + 99, 'WITHSCORES')
        if #batch == 0 then break end
        local ids = {}
        for j = 1, #batch, 2 do ids[#ids + 1] = batch[j] end
        local vals = redis.call('HMGET', tok, unpack(ids))
        local found = false
        for j = 1, #ids do
          freed = freed + (tonumber(vals[j]) or 0)
          if freed >= need then wait = tonumber(batch[2 * j]) + W - now; found = true; break end
        end
        if found then break end
        start = start + 100
      end
      fail(i, 2, wait, 0)
    end
    if tpd >= 0 and tokens > tpd then
      fail(i, 3, -1, 1)
    elseif tpd >= 0 and day_used + tokens > tpd then
      fail(i, 3, day_left, 0)
    end
    if cc == 0 then
      fail(i, 4, -1, 1)
    elseif cc > 0 and inflight + 1 > cc then
      fail(i, 4, -1, 0)
    end
  end
end
local status = 0
if dup then
  status = 2
elseif #failures == 0 then
  status = 1
  local window_ms = math.ceil(W / 1000) + 1000
  local day_ms = math.ceil(day_left / 1000) + 60000
  local lease_ms = math.ceil(lease / 1000) + 1000
  for i = 1, n do
    local k = 1 + (i - 1) * 4
    local log, tok, day, conc = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
    local s = states[i]
    -- The reads above happened in this same script, so writing absolute totals is race-free.
    redis.call('ZADD', log, num(now), rid)
    redis.call('HSET', tok, rid, ARGV[2], '', num(s[2] + tokens))
    redis.call('HSET', day, 'd', num(today), 't', num(s[3] + tokens))
    redis.call('ZADD', conc, num(now + lease), rid)
    redis.call('PEXPIRE', log, window_ms)
    redis.call('PEXPIRE', tok, window_ms)
    redis.call('PEXPIRE', day, day_ms)
    extend(conc, lease_ms)  -- never shorten: a replica configured with a longer lease may hold members
    states[i] = {s[1] + 1, s[2] + tokens, s[3] + tokens, s[4] + 1}
  end
  redis.call('HSET', KEYS[1], 't', ARGV[2], 'ts', num(now), 'd', num(today), 's', ARGV[7])
  redis.call('PEXPIRE', KEYS[1], math.ceil((lease + W) / 1000) + 60000)
end
local out = {status, #failures}
for _, f in ipairs(failures) do out[#out + 1] = f end
for i = 1, n do
  local s = states[i]
  local reset = W
  if status ~= 1 then reset = newest_reset(KEYS[1 + (i - 1) * 4 + 1], now, W) end
  out[#out + 1] = num(s[1]) .. ',' .. num(s[2]) .. ',' .. num(s[3]) .. ',' .. num(s[4]) .. ',' .. num(reset)
end
return table.concat(out, ',')
"""
)

# KEYS: [reservation]; ARGV: actual_tokens, key prefix, request_id. Returns 1 if settled now, 0 if nothing to do.
SETTLE = r"""
local r = redis.call('HMGET', KEYS[1], 't', 'd', 's')
if not r[1] then return 0 end
redis.call('DEL', KEYS[1])
local reserved = tonumber(r[1])
local actual = math.max(0, math.min(reserved, tonumber(ARGV[1])))
local refund = reserved - actual
local rid = ARGV[3]
for _, name in ipairs(cjson.decode(r[3])) do
  local base = ARGV[2] .. 's:' .. name
  if refund > 0 then
    local tok = base .. ':tok'
    if redis.call('HEXISTS', tok, rid) == 1 then
      redis.call('HINCRBY', tok, rid, string.format('%.0f', -refund))
      redis.call('HINCRBY', tok, '', string.format('%.0f', -refund))
    end
    local day = base .. ':day'
    local dd = redis.call('HMGET', day, 'd', 't')
    local today_used = tonumber(dd[2]) or 0
    if dd[1] == r[2] and today_used > 0 then
      redis.call('HINCRBY', day, 't', string.format('%.0f', -math.min(refund, today_used)))
    end
  end
  redis.call('ZREM', base .. ':conc', rid)
end
return 1
"""

# KEYS: log, tok, day, conc of one scope; ARGV: now_us or '', window_us.
# Returns {requests, tokens, tokens_today, in_flight, reset_us, now_us}.
USAGE = (
    _COMMON
    + r"""
local now = clock(ARGV[1])
local W = tonumber(ARGV[2])
trim(KEYS[1], KEYS[2], now - W)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', num(now))
local dd = redis.call('HMGET', KEYS[3], 'd', 't')
local day_used = 0
if tonumber(dd[1]) == math.floor(now / DAY) then day_used = tonumber(dd[2]) or 0 end
return {redis.call('ZCARD', KEYS[1]), tonumber(redis.call('HGET', KEYS[2], '')) or 0, day_used,
        redis.call('ZCARD', KEYS[4]), newest_reset(KEYS[1], now, W), now}
"""
)
