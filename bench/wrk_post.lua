-- wrk script: POST one fixed JSON body to one path, then print the run's figures as JSON.
-- Usage: wrk ... -s bench/wrk_post.lua URL -- PATH BODY_FILE [AUTH_KEY]
-- The request is formatted once per thread; no response() hook (it would slow wrk down).

local req

function init(args)
  local path, body_file, key = args[1], args[2], args[3]
  local f = assert(io.open(body_file, "rb"))
  local body = f:read("*a")
  f:close()
  local headers = { ["Content-Type"] = "application/json" }
  if key ~= nil and key ~= "" then
    headers["Authorization"] = "Bearer " .. key
  end
  req = wrk.format("POST", path, headers, body)
end

function request()
  return req
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
