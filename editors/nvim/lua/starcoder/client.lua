-- The one LSP client of the plugin: how it starts (spawned or remote), which buffers it
-- attaches to, and what the server said about loading the model.
local compat = require("starcoder.compat")
local config = require("starcoder.config")

local M = {}

local NAME = "starcoder"
local client_id = nil

-- The latest `$/progress` of the model load: { message = "...", percentage = n, done = bool }.
M.progress = {}

-- Statuslines show status(): Neovim redraws them on its own only for a key or an event of its
-- own (0.7 happened to for $/progress, 0.11 does not).
local redraw_status = vim.schedule_wrap(function()
  vim.cmd("redrawstatus!")
end)

local function set_progress(progress)
  M.progress = progress
  redraw_status()
end

local function on_progress(err, result, ctx, cfg)
  local value = result and result.value or {}
  if value.kind == "begin" or value.kind == "report" then
    set_progress({ message = value.message or value.title, percentage = value.percentage })
  elseif value.kind == "end" then
    set_progress({ message = value.message, percentage = 100, done = true })
  end
  local default = vim.lsp.handlers["$/progress"]
  if default then
    return default(err, result, ctx, cfg)
  end
end

-- Neovim 0.7 has no TCP client: a small pipe between stdio and the socket stands in.
local PYTHON_PIPE = [[
import socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def upstream():
    while True:
        data = sys.stdin.buffer.read1(65536)
        if not data:
            break
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=upstream, daemon=True).start()
while True:
    data = s.recv(65536)
    if not data:
        break
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
]]

--- How to reach a remote server: Neovim's own TCP client where it has one, else a pipe.
local function remote_cmd(options)
  local host, port = options.host, options.port
  if options.tls then -- Neovim speaks no TLS: openssl does, verifying the certificate
    local cmd = { "openssl", "s_client", "-quiet", "-verify_return_error" }
    vim.list_extend(cmd, { "-connect", host .. ":" .. port, "-servername", host })
    vim.list_extend(cmd, { "-verify_hostname", host })
    if options.tls_ca then
      vim.list_extend(cmd, { "-CAfile", vim.fn.expand(options.tls_ca) })
    end
    return cmd
  end
  if vim.lsp.rpc.connect then -- Neovim >= 0.8, which wants an address, not a name
    local found = compat.uv.getaddrinfo(host, nil, { socktype = "stream" })
    return vim.lsp.rpc.connect(found and found[1] and found[1].addr or host, port)
  end
  if vim.fn.executable("python3") == 1 then
    return { "python3", "-c", PYTHON_PIPE, host, tostring(port) }
  elseif vim.fn.executable("socat") == 1 then
    return { "socat", "-", ("TCP:%s:%d"):format(host, port) }
  end
  error("starcoder: Neovim 0.7 needs python3 or socat to reach " .. host .. ", or set cmd")
end

local function capabilities()
  local caps = vim.lsp.protocol.make_client_capabilities()
  caps.textDocument = caps.textDocument or {}
  caps.textDocument.inlineCompletion = { dynamicRegistration = false }
  caps.workspace = caps.workspace or {}
  caps.workspace.applyEdit = true
  return caps
end

-- Why the server cannot be used (it failed to start, or exited with an error): then the
-- plugin does not start it again on every buffer, until restart().
M.failure = nil

local function fail(message)
  M.failure = message
  set_progress({ message = message, done = true })
  vim.schedule(function()
    vim.notify("starcoder: " .. message, vim.log.levels.ERROR)
  end)
end

-- A server that loaded its model before this client connected (a remote one, long running)
-- reports no progress: ask it once whether the model is ready.
local function on_init(client)
  compat.request(client, "starcoder/stats", vim.empty_dict(), function(err, stats)
    if err or type(stats) ~= "table" or M.progress.done or M.progress.percentage then
      return
    end
    if stats.error and stats.error ~= vim.NIL then
      set_progress({ message = "error: " .. tostring(stats.error), done = true })
    elseif stats.ready then
      set_progress({ message = "ready", percentage = 100, done = true })
    end
  end)
end

function M.lsp_config(options)
  return {
    name = NAME,
    cmd = options.host and remote_cmd(options) or config.command(options),
    root_dir = compat.uv.cwd(),
    init_options = config.init_options(options),
    capabilities = capabilities(),
    handlers = { ["$/progress"] = on_progress },
    on_init = on_init,
    on_exit = function(code, _, id)
      if id ~= client_id then -- a client stopped on purpose
        return
      end
      client_id = nil
      if code ~= 0 then
        fail(("the server exited with code %d (see :LspLog)"):format(code))
      end
    end,
  }
end

--- The running client, or nil.
function M.get()
  local client = client_id and vim.lsp.get_client_by_id(client_id)
  if client and not compat.is_stopped(client) then
    return client
  end
end

--- The running client, started if it is not (and did not fail before).
function M.ensure()
  local client = M.get()
  if client or M.failure or client_id then -- client_id: exiting, on_exit will tell why
    return client
  end
  set_progress({ message = "starting" })
  local ok, id = pcall(compat.start_client, M.lsp_config(config.options))
  if not ok or not id then
    fail("the server could not be started: " .. tostring(ok and "no client" or id))
    return nil
  end
  client_id = id
  return vim.lsp.get_client_by_id(id)
end

function M.stop()
  local client = M.get()
  client_id = nil
  if client then
    compat.stop(client)
  end
end

--- Stops the server, forgets a failure, and attaches a new one to the buffers it serves.
function M.restart()
  M.stop()
  M.failure = nil
  for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(bufnr) then
      M.attach(bufnr)
    end
  end
end

--- Whether the plugin serves this buffer: a file, of a configured filetype.
function M.wants(bufnr)
  if vim.bo[bufnr].buftype ~= "" or vim.api.nvim_buf_get_name(bufnr) == "" then
    return false
  end
  local filetypes = config.options.filetypes
  return filetypes == nil or vim.tbl_contains(filetypes, vim.bo[bufnr].filetype)
end

--- Attaches the client to the buffer if the plugin serves it; returns the client.
function M.attach(bufnr)
  if not M.wants(bufnr) then
    return nil
  end
  local client = M.ensure()
  if client and not vim.lsp.buf_is_attached(bufnr, client.id) then
    vim.lsp.buf_attach_client(bufnr, client.id)
  end
  return client
end

--- The client if it is attached to the buffer.
function M.for_buffer(bufnr)
  local client = M.get()
  if client and vim.lsp.buf_is_attached(bufnr, client.id) then
    return client
  end
end

--- Waits (blocking, at most timeout_ms) for the client to finish `initialize`.
function M.wait_initialized(client, timeout_ms)
  return vim.wait(timeout_ms, function()
    return client.initialized or compat.is_stopped(client)
  end, 20) and client.initialized
end

return M
