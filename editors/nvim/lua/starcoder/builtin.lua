-- Neovim >= 0.12 shows inline completions itself (vim.lsp.inline_completion); with
-- `builtin = true` the plugin only starts the server and maps the keys to it.
local M = {}

function M.available()
  return vim.fn.has("nvim-0.12") == 1 and vim.lsp.inline_completion ~= nil
end

--- Turns Neovim's inline completions from the plugin's client on or off.
function M.enable(client_id, enabled)
  vim.lsp.inline_completion.enable(enabled ~= false, { client_id = client_id })
end

--- Accepts the shown candidate; false when there is none.
function M.accept()
  return vim.lsp.inline_completion.get() ~= false
end

function M.next()
  vim.lsp.inline_completion.select({ count = 1 })
end

return M
