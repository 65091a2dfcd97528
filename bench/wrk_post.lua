-- wrk script of the closed loop (bench/wrk.py): each request is the next pre-built,
-- pre-signed, unique POST of the file the harness wrote for this thread, so every
-- request is a new call and none is ever sent twice. Every answer's status is counted
-- (wrk alone counts only >= 400 as errors), and done() prints one JSON line the harness
-- parses. File format: "<byte length>\n<raw HTTP request>" repeated.
--
-- Usage: wrk -t N -c C -d S -s wrk_post.lua http://host:port -- <file prefix>
-- (thread k reads "<prefix>.<k>").

local threads = {}
local started = 0

function setup(thread)
  thread:set("id", started)
  started = started + 1
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(args[1] .. "." .. id, "rb"))
  local data = f:read("*a")
  f:close()
  pool = {}
  local pos, n = 1, 0
  while pos <= #data do
    local nl = string.find(data, "\n", pos, true)
    local len = tonumber(string.sub(data, pos, nl - 1))
    n = n + 1
    pool[n] = string.sub(data, nl + 1, nl + len)
    pos = nl + len + 1
  end
  size = n
  sent = 0
  -- Set once the pool ran out: the harness then discards the round and retries with a
  -- bigger pool, because what was sent after it would be repeats.
  exhausted = 0
  statuses = {}
end

function request()
  sent = sent + 1
  if sent > size then
    exhausted = 1
    wrk.thread:stop()
    return pool[size]
  end
  return pool[sent]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local codes, exhausted_threads, taken, parts = {}, 0, 0, {}
  for _, thread in ipairs(threads) do
    taken = taken + math.min(thread:get("sent"), thread:get("size"))
    for code, count in pairs(thread:get("statuses")) do
      codes[code] = (codes[code] or 0) + count
    end
    exhausted_threads = exhausted_threads + thread:get("exhausted")
  end
  for code, count in pairs(codes) do
    table.insert(parts, string.format('"%d":%d', code, count))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK-JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d},' ..
    '"latency_us":{"p50":%d,"p99":%d,"max":%d},"codes":{%s},"exhausted_threads":%d,"taken":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max,
    table.concat(parts, ","), exhausted_threads, taken))
end
