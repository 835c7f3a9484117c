-- wrk script for etcd's v3 JSON gateway: POST /v3/kv/put {"key","value"} and POST /v3/kv/range
-- {"key"} (linearizable by default: serializable=false). Keys and values are base64, as the
-- gateway requires. See common.lua for the arguments.
dofile(os.getenv("COMPARE_LUA_DIR") .. "/common.lua")

local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function b64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local c1 = math.floor(n / 262144) % 64
    local c2 = math.floor(n / 4096) % 64
    local c3 = math.floor(n / 64) % 64
    local c4 = n % 64
    out[#out + 1] = alphabet:sub(c1 + 1, c1 + 1) .. alphabet:sub(c2 + 1, c2 + 1)
      .. (b and alphabet:sub(c3 + 1, c3 + 1) or "=")
      .. (c and alphabet:sub(c4 + 1, c4 + 1) or "=")
  end
  return table.concat(out)
end

function init(args)
  parse_args(args)
  value_b64 = b64(string.rep("v", value_size))
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  local key = b64(next_key())
  -- etcd has no lease read level (its serializable reads are stale reads): the `lease` row
  -- compares raftkv's lease reads with what etcd offers for a linearizable read.
  if mode == "get" or mode == "lease" then
    return wrk.format("POST", "/v3/kv/range", headers, '{"key":"' .. key .. '"}')
  end
  return wrk.format("POST", "/v3/kv/put", headers,
    '{"key":"' .. key .. '","value":"' .. value_b64 .. '"}')
end
