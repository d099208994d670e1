-- wrk script for every HTTP case: counts answers by status and prints one JSON line at the end.
-- Arguments (after `--`): path, expected status, and optionally a file of PAYMENT-SIGNATURE
-- headers, one per line: each request takes the next unused one (split among threads), so every
-- paid request carries a fresh authorization; when they run out, requests go out with an invalid
-- header and are counted as "exhausted" (the harness signs enough to avoid it).
local counter = 0
local threads = {}

function setup(thread)
  thread:set("id", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

function init(args)
  path = args[1]
  expected = tonumber(args[2])
  headers_file = args[3]
  nthreads = tonumber(args[4] or "1")
  lines = {}
  if headers_file ~= nil and headers_file ~= "" then
    local i = 0
    for line in io.lines(headers_file) do
      if i % nthreads == id then
        lines[#lines + 1] = line
      end
      i = i + 1
    end
  end
  idx = 0
  ok = 0
  bad = 0
  exhausted = 0
  bad_status = 0
end

function request()
  if headers_file == nil or headers_file == "" then
    return wrk.format("GET", path)
  end
  idx = idx + 1
  local h = lines[idx]
  if h == nil then
    exhausted = exhausted + 1
    h = "exhausted"
  end
  return wrk.format("GET", path, { ["PAYMENT-SIGNATURE"] = h })
end

function response(status, headers, body)
  if status == expected then
    ok = ok + 1
  else
    bad = bad + 1
    bad_status = status
  end
end

function done(summary, latency, requests)
  local t_ok, t_bad, t_ex, t_status = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    t_ok = t_ok + t:get("ok")
    t_bad = t_bad + t:get("bad")
    t_ex = t_ex + t:get("exhausted")
    if t:get("bad_status") ~= 0 then t_status = t:get("bad_status") end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"ok":%d,"bad":%d,"bad_status":%d,' ..
    '"exhausted":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), t_ok, t_bad, t_status,
    t_ex, e.connect + e.read + e.write + e.timeout))
end
