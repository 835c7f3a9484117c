-- wrk script for raftkv's HTTP API: PUT /kv/{key} {"value": ...}, GET /kv/{key}
-- (linearizable by default, i.e. ReadIndex). See common.lua for the arguments.
-- MODE lease reads GET /kv/{key}?consistency=lease (served from the leader's lease when the
-- cluster runs with --lease-reads, else like a linearizable read).
-- raftkv only: MODE cas sends conditional puts that succeed without a read:
-- PUT /kv/cas-<run>-<thread>-<n>?if_mod_revision=0 ("only if absent") on keys never written.
dofile(os.getenv("COMPARE_LUA_DIR") .. "/common.lua")

function init(args)
  parse_args(args)
  body = '{"value":"' .. string.rep("v", value_size) .. '"}'
  headers = { ["Content-Type"] = "application/json" }
  -- Per run, so a later cell on the same cluster does not meet this run's keys.
  run = os.time()
end

function request()
  if mode == "cas" then
    counter = counter + 1
    local path = string.format("/kv/cas-%d-%d-%d?if_mod_revision=0", run, tid or 0, counter)
    return wrk.format("PUT", path, headers, body)
  end
  local path = "/kv/" .. next_key()
  if mode == "get" then
    return wrk.format("GET", path)
  end
  if mode == "lease" then
    return wrk.format("GET", path .. "?consistency=lease")
  end
  return wrk.format("PUT", path, headers, body)
end
