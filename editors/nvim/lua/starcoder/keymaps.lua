-- The insert-mode keys of setup({ keys = {...} }). Where a key's action does not apply (no
-- suggestion shown), the key keeps its usual meaning.
local builtin = require("starcoder.builtin")
local suggestion = require("starcoder.suggestion")

local M = {}

-- Each key: when it applies, and what it does.
local function on_suggestion(run)
  return { when = suggestion.visible, run = run }
end

local actions = {
  accept = on_suggestion(function()
    suggestion.accept("all")
  end),
  accept_word = on_suggestion(function()
    suggestion.accept("word")
  end),
  accept_line = on_suggestion(function()
    suggestion.accept("line")
  end),
  dismiss = on_suggestion(suggestion.dismiss),
  next = {
    when = function()
      return true
    end,
    run = suggestion.next,
  },
}

--- Runs a key's action (from the <Cmd> the mapping returns).
function M.run(name)
  actions[name].run()
end

--- Maps the keys to the plugin's own suggestions.
---@param keys starcoder.Keys
function M.set(keys)
  for name, lhs in pairs(keys) do
    if lhs and actions[name] then
      local rhs = ("<Cmd>lua require('starcoder.keymaps').run(%q)<CR>"):format(name)
      vim.keymap.set("i", lhs, function()
        if actions[name].when() then
          return rhs
        end
        return lhs
      end, { expr = true, silent = true, desc = "starcoder: " .. name })
    end
  end
end

--- Maps the keys to Neovim's vim.lsp.inline_completion (builtin = true): only accept and
--- next; the rest is Neovim's business.
---@param keys starcoder.Keys
function M.set_builtin(keys)
  if keys.accept then
    vim.keymap.set("i", keys.accept, function()
      if not builtin.accept() then
        return keys.accept
      end
    end, { expr = true, silent = true, desc = "starcoder: accept" })
  end
  if keys.next then
    vim.keymap.set("i", keys.next, builtin.next, { desc = "starcoder: next suggestion" })
  end
end

return M
