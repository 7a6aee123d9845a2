-- Token bucket for Redis, the same semantics as resilience.rate_limit:
-- KEYS[1] the bucket; ARGV capacity, refill_per_sec, cost.  Returns 1 if cost
-- tokens were taken, else 0.  A missing key is a full bucket.
--
-- The clock is the server's TIME, read inside the script: Redis 7 always
-- replicates a script's effects, not the script, so this is allowed.
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])	-- microseconds

local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
if now > ts then	-- time never runs backwards for a bucket
	tokens = math.min(capacity, tokens + (now - ts) * rate / 1000000)
	ts = now
end

local allowed = 0
if tokens >= cost then
	tokens = tokens - cost
	allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', ts)	-- HMSET's modern name
-- Expire once the bucket would be full again (then it is the same as absent);
-- at least a minute, so the benchmark's keys stay resident like the others'.
redis.call('PEXPIRE', KEYS[1], math.max(60000, math.ceil((capacity - tokens) / rate * 1000)))
return allowed
