-- wrk script for raftkv's HTTP API: PUT /kv/{key} {"value": ...}, GET /kv/{key}
-- (linearizable by default, i.e. ReadIndex). See common.lua for the arguments.
dofile(os.getenv("COMPARE_LUA_DIR") .. "/common.lua")

function init(args)
  parse_args(args)
  body = '{"value":"' .. string.rep("v", value_size) .. '"}'
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  local path = "/kv/" .. next_key()
  if mode == "get" then
    return wrk.format("GET", path)
  end
  return wrk.format("PUT", path, headers, body)
end
