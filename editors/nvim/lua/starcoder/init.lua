-- starcoder.nvim: inline completions from a starcoder-lsp server.
--
--   require("starcoder").setup({ model = "bigcode/tiny_starcoder_py" })
--
-- See editors/README.md for the options, keys and a remote server.
local builtin = require("starcoder.builtin")
local client = require("starcoder.client")
local compat = require("starcoder.compat")
local config = require("starcoder.config")
local context = require("starcoder.context")
local docstring = require("starcoder.docstring")
local keymaps = require("starcoder.keymaps")
local render = require("starcoder.render")
local suggestion = require("starcoder.suggestion")

local api = vim.api
local M = {}

local configured = false

local function use_builtin()
  return config.options.builtin and builtin.available()
end

local function attach(bufnr)
  local c = client.attach(bufnr)
  if c and use_builtin() then
    builtin.enable(c.id, suggestion.enabled)
  end
end

local function setup_highlight()
  vim.cmd("highlight default link " .. config.options.hl_group .. " Comment")
  -- For terminals where Comment has no colour of its own (see render.group).
  vim.cmd("highlight default " .. render.fallback_group .. " ctermfg=8 guifg=Grey")
end

--- Starts the plugin: options (see config.lua, `:help starcoder-setup`), autocommands that
--- attach the client to buffers, the highlight and the keys.
---@param user starcoder.Options|nil
function M.setup(user)
  local options = config.set(user)
  if options.builtin and not builtin.available() then
    local message = "starcoder: builtin = true needs Neovim 0.12; the plugin shows suggestions"
    vim.notify(message, vim.log.levels.WARN)
  end
  local group = api.nvim_create_augroup("starcoder", { clear = true })
  api.nvim_create_autocmd({ "BufEnter", "FileType" }, {
    group = group,
    callback = function(event)
      attach(event.buf)
    end,
  })
  if options.context then
    context.setup(group)
  end
  api.nvim_create_autocmd("ColorScheme", { group = group, callback = setup_highlight })
  api.nvim_create_autocmd({ "ColorScheme", "OptionSet" }, {
    group = group,
    pattern = { "*", "termguicolors" },
    callback = function(event)
      if event.event == "ColorScheme" or event.match == "termguicolors" then
        suggestion.redraw()
      end
    end,
  })
  setup_highlight()
  if use_builtin() then
    keymaps.set_builtin(options.keys)
  else
    suggestion.setup_autocmds()
    keymaps.set(options.keys)
  end
  configured = true
  client.attach_buffer = attach
  attach(api.nvim_get_current_buf())
end

function M.is_setup()
  return configured
end

local function need_setup()
  if not configured then
    vim.notify("starcoder: call require('starcoder').setup() first", vim.log.levels.ERROR)
    return true
  end
end

--- Restarts the server (:StarcoderRestart), e.g. after it failed to start.
function M.restart()
  if not need_setup() then
    client.restart()
  end
end

--- Accepts the whole suggestion shown; false if there is none (for your own mappings).
function M.accept()
  if use_builtin() then
    return builtin.accept()
  end
  return suggestion.accept("all")
end

function M.accept_word()
  return suggestion.accept("word")
end

function M.accept_line()
  return suggestion.accept("line")
end

function M.dismiss()
  local shown = suggestion.visible()
  suggestion.dismiss()
  return shown
end

--- Shows the next suggestion (asks the server again when it gave only one).
function M.next()
  if use_builtin() then
    return builtin.next()
  end
  suggestion.next()
end

--- The text the shown suggestion would insert at the cursor, or nil.
function M.suggestion()
  return suggestion.current_text()
end

--- Generates a docstring for the function or class at the cursor (:StarcoderDocstring).
function M.docstring(on_done)
  if need_setup() then
    return
  end
  docstring.run(on_done)
end

--- The server's `starcoder/stats` (blocking, at most timeout_ms); nil and a reason on failure.
function M.stats(timeout_ms)
  timeout_ms = timeout_ms or 5000
  local c = client.wait_client(timeout_ms)
  if not c then
    return nil, client.why()
  end
  if not client.wait_initialized(c, timeout_ms) then
    return nil, "the server did not answer initialize in " .. timeout_ms .. " ms"
  end
  local response, err = compat.request_sync(c, "starcoder/stats", vim.empty_dict(), timeout_ms)
  if not response then
    return nil, err or "no answer"
  end
  if response.err then
    return nil, response.err.message or vim.inspect(response.err)
  end
  return response.result
end

--- A short state for statuslines: "off", "starting", "loading 40%", "ready" or an error.
function M.status()
  if not suggestion.enabled then
    return "off"
  end
  if not client.get() then
    return client.progress.message or "stopped"
  end
  local progress = client.progress
  if progress.done then
    return progress.message or "ready"
  end
  if progress.percentage then
    return ("%s %d%%"):format(progress.message or "loading", progress.percentage)
  end
  return progress.message or "ready"
end

function M.enable()
  suggestion.enabled = true
  local c = client.get()
  if c and use_builtin() then
    builtin.enable(c.id, true)
  end
end

function M.disable()
  suggestion.enabled = false
  suggestion.dismiss()
  local c = client.get()
  if c and use_builtin() then
    builtin.enable(c.id, false)
  end
end

function M.toggle()
  if suggestion.enabled then
    M.disable()
  else
    M.enable()
  end
  vim.notify("starcoder: " .. (suggestion.enabled and "on" or "off"))
end

return M
