-- :checkhealth starcoder: is the server reachable, is the model loaded?
local builtin = require("starcoder.builtin")
local client = require("starcoder.client")
local compat = require("starcoder.compat")
local config = require("starcoder.config")

local M = {}

local function check_setup(health, options)
  local version = vim.version()
  health.info(("Neovim %d.%d.%d"):format(version.major, version.minor, version.patch))
  if options.builtin then
    if builtin.available() then
      health.ok("suggestions shown by vim.lsp.inline_completion (builtin = true)")
    else
      health.warn("builtin = true needs Neovim 0.12: the plugin shows suggestions itself")
    end
  else
    local how = compat.inline_virt_text and "inline virtual text" or "overlay virtual text"
    health.ok("suggestions shown by the plugin as " .. how)
  end
end

local function check_connection(health, options)
  if options.host then
    local tls = options.tls and " (TLS)" or ""
    health.info(("remote server %s:%d%s"):format(options.host, options.port, tls))
    if options.tls and vim.fn.executable("openssl") == 0 then
      health.error("tls = true needs the `openssl` command")
      return false
    end
    if not (options.token or vim.env.STARCODER_LSP_TOKEN) then
      health.info("no token set (token or $STARCODER_LSP_TOKEN): fine for a server on localhost")
    end
    return true
  end
  local cmd = config.command(options)
  health.info("server command: " .. table.concat(cmd, " "))
  if vim.fn.executable(cmd[1]) == 0 then
    health.error(("`%s` is not executable"):format(cmd[1]), {
      "pip install the starcoder-lsp package, or set cmd to the server's full path",
    })
    return false
  end
  health.ok(("`%s` found"):format(cmd[1]))
  return true
end

local function check_model(health)
  local stats, err = require("starcoder").stats(10000)
  if not stats then
    health.error("the server is not reachable: " .. tostring(err))
    return
  end
  health.ok("the server answers")
  if stats.ready then
    health.ok("model loaded: " .. tostring(stats.model))
    local counts = "%d requests, %d shown, %d accepted"
    health.info(counts:format(stats.requests or 0, stats.shown or 0, stats.accepted or 0))
  elseif stats.error and stats.error ~= vim.NIL then
    health.error("the model failed to load: " .. tostring(stats.error))
  else
    local loading = stats.loading or client.progress.message
    health.warn("the model is still loading: " .. tostring(loading))
  end
end

function M.check()
  local health = compat.health()
  health.start("starcoder")
  if not require("starcoder").is_setup() then
    health.error("require('starcoder').setup() was not called")
    return
  end
  local options = config.options
  check_setup(health, options)
  if check_connection(health, options) then
    check_model(health)
  end
end

return M
