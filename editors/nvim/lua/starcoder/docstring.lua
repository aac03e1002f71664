-- :StarcoderDocstring: the server writes a docstring for the function or class at the cursor
-- and inserts it with workspace/applyEdit (handled by Neovim's LSP client).
local client = require("starcoder.client")
local compat = require("starcoder.compat")

local M = {}

M.COMMAND = "starcoder.generateDocstring"

-- The last reply: { err = ..., result = { applied = bool, docstring = str } }.
M.last = nil

local function notify(message, level)
  vim.notify("starcoder: " .. message, level or vim.log.levels.INFO)
end

--- on_done(err, result) is called with the server's reply.
function M.run(on_done)
  local bufnr = vim.api.nvim_get_current_buf()
  if not client.wants(bufnr) then
    notify("this buffer is not served (no file, or filetype not configured)", vim.log.levels.WARN)
    return
  end
  local c = client.attach(bufnr)
  if not c and client.wait_client(10000) then -- a remote server, being connected to
    c = client.attach(bufnr)
  end
  if not c then
    notify("no server: " .. client.why(), vim.log.levels.ERROR)
    return
  end
  if not client.wait_initialized(c, 10000) then
    notify("the server did not start", vim.log.levels.ERROR)
    return
  end
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  local character = compat.character(vim.api.nvim_get_current_line(), col, compat.encoding(c))
  local position = { line = row - 1, character = character }
  local params = { command = M.COMMAND, arguments = { vim.uri_from_bufnr(bufnr), position } }
  notify("writing a docstring…")
  compat.request(c, "workspace/executeCommand", params, function(err, result)
    M.last = { err = err, result = result }
    if err then
      notify("docstring failed: " .. (err.message or vim.inspect(err)), vim.log.levels.ERROR)
    elseif type(result) == "table" and result.applied == false then
      notify("no docstring: " .. tostring(result.reason or "not applied"), vim.log.levels.WARN)
    else
      notify("docstring written")
    end
    if on_done then
      on_done(err, result)
    end
  end, bufnr)
end

return M
