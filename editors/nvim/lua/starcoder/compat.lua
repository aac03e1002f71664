-- Differences between Neovim 0.7 and the current release, in one place.
local M = {}

M.uv = vim.uv or vim.loop

---@param version string like "0.10"
function M.has(version)
  return vim.fn.has("nvim-" .. version) == 1
end

-- Extmarks can be drawn between characters (virt_text_pos = "inline") from 0.10 on.
M.inline_virt_text = M.has("0.10")

-- Client methods are called with ":" from 0.11 on; "." still works there but is deprecated.
local method_calls = M.has("0.11")

-- Calls a client method the way this Neovim expects.
local function call(client, name, ...)
  if method_calls then
    return client[name](client, ...)
  end
  return client[name](...)
end

for _, name in ipairs({ "request", "request_sync", "notify", "cancel_request", "is_stopped", "stop" }) do
  M[name] = function(client, ...)
    return call(client, name, ...)
  end
end

--- Starts a client without attaching it to a buffer; returns its id.
function M.start_client(config)
  if M.has("0.11") then
    return vim.lsp.start(config, {
      attach = false,
      reuse_client = function()
        return false
      end,
    })
  end
  return vim.lsp.start_client(config)
end

--- The LSP character offset of byte column `col` in `line`.
function M.character(line, col, encoding)
  col = math.min(col, #line)
  if encoding == "utf-8" then
    return col
  end
  if M.has("0.11") then
    return vim.str_utfindex(line, encoding, col, false)
  end
  local utf32, utf16 = vim.str_utfindex(line, col)
  return encoding == "utf-16" and utf16 or utf32
end

--- The byte column of LSP character offset `character` in `line`.
function M.byte_col(line, character, encoding)
  if encoding == "utf-8" then
    return math.min(character, #line)
  end
  if M.has("0.11") then
    return math.min(vim.str_byteindex(line, encoding, character, false), #line)
  end
  local ok, col = pcall(vim.str_byteindex, line, character, encoding == "utf-16")
  return ok and col or #line
end

--- The position encoding the server chose ("utf-16" unless it said otherwise).
function M.encoding(client)
  local capabilities = client.server_capabilities or {}
  return capabilities.positionEncoding or client.offset_encoding or "utf-16"
end

--- :checkhealth reporters: vim.health on 0.10+, require("health") before.
function M.health()
  local health = vim.health or require("health")
  return {
    start = health.start or health.report_start,
    ok = health.ok or health.report_ok,
    info = health.info or health.report_info,
    warn = health.warn or health.report_warn,
    error = health.error or health.report_error,
  }
end

return M
