-- Shared by raftkv.lua and etcd.lua (loaded with dofile): argument parsing, key choice and the
-- one-line result that compare-etcd.sh parses. Both systems get exactly the same key sequence.
--
-- Script arguments (after `--` on the wrk command line):
--   MODE VALUE_SIZE KEY_SPACE OFFSET THREADS
--   MODE: put (random keys), get (random keys), lease (random keys, raftkv's lease level; etcd
--   reads linearizably), seq (offset + thread + n*THREADS, for preloading
--   every key once and for the 1M-write RSS phase).

local threads_created = 0

-- Runs in wrk's main Lua state, once per thread, before that thread's init().
function setup(thread)
  thread:set("tid", threads_created)
  threads_created = threads_created + 1
end

function parse_args(args)
  mode = args[1] or "put"
  value_size = tonumber(args[2] or "256")
  key_space = tonumber(args[3] or "10000")
  offset = tonumber(args[4] or "0")
  nthreads = tonumber(args[5] or "1")
  counter = 0
  math.randomseed(20261127 + (tid or 0))
end

function next_key()
  local k
  if mode == "seq" then
    k = offset + (tid or 0) + counter * nthreads
    if key_space > 0 then k = k % key_space end
  else
    k = math.random(0, key_space - 1)
  end
  counter = counter + 1
  return string.format("k%08d", k)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d errors=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
