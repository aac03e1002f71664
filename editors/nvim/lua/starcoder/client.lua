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

-- Neovim 0.7 has no TCP client: a small pipe between stdio and the socket stands in. A
-- connection that fails or breaks ends it with code 0 and the reason on stderr (:LspLog): the
-- plugin reconnects, and Neovim would warn of any other code every time.
local PYTHON_PIPE = [[
import os, socket, sys, threading
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    def upstream():
        try:
            while True:
                data = sys.stdin.buffer.read1(65536)
                if not data:
                    break
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    threading.Thread(target=upstream, daemon=True).start()
    while True:
        data = s.recv(65536)
        if not data:
            break
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
except OSError as e:
    sys.stderr.write("starcoder: connection to %s:%s: %s\n" % (sys.argv[1], sys.argv[2], e))
os._exit(0)  # without flushing a stdout that Neovim may have closed
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

-- A remote server (`host`) can go away and come back: a replica behind a load balancer
-- restarts or fails, the network drops. The plugin then connects again, after 0.5 s, 1 s,
-- 2 s, ... and at most 30 s between tries, until a connection initializes; it attaches the
-- buffers again (Neovim sends each one's text in didOpen), and `initialize` carries the
-- settings again. So a replica's failure costs a suggestion or two, not a restart of Neovim.
M.RETRY_FIRST_MS = 500
M.RETRY_MAX_MS = 30000
-- Short outages pass in silence (status() says "reconnecting"); this many failed tries in a
-- row are worth one message, and the connection coming back another.
local NOTIFY_AFTER = 3

local retry = {
  attempts = 0, -- failed tries since the last connection that initialized
  reason = nil, -- why the last one failed
  dropped = false, -- a connection that had initialized ended, and not by the plugin
  live = nil, -- the id of the client whose connection initialized
  connecting = false, -- a try is under way (the port is being checked)
  waiting = false, -- a try is scheduled
  notified = false,
  generation = 0, -- stop() bumps it: what a try of before then finds out is ignored
}

--- The delay before the `attempt`-th try in a row (1-based): 0.5 s doubling, at most 30 s.
function M.retry_delay(attempt)
  return math.min(M.RETRY_FIRST_MS * 2 ^ (attempt - 1), M.RETRY_MAX_MS)
end

local function address(options)
  return ("%s:%d"):format(options.host, options.port)
end

--- Why there is no client now, for messages: a failure, or the connection being retried.
function M.why()
  if M.failure then
    return M.failure
  end
  if retry.waiting or retry.connecting then
    local reason = retry.reason and (": " .. retry.reason) or ""
    local where = address(config.options)
    return ("connecting to %s (try %d)%s"):format(where, retry.attempts + 1, reason)
  end
  return "the server could not be started"
end

local function on_connected()
  if retry.notified then
    vim.notify("starcoder: connected again to " .. address(config.options), vim.log.levels.INFO)
  end
  retry.attempts, retry.reason, retry.dropped, retry.notified = 0, nil, false, false
end

-- A server that loaded its model before this client connected (a remote one, long running)
-- reports no progress: ask it once whether the model is ready.
local function on_init(client)
  retry.live = client.id
  on_connected()
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

local connect -- below: a try at the remote server

--- Tries again after the backoff delay; `reason`: why the last try, or the connection, ended.
local function retry_later(reason)
  retry.attempts = retry.attempts + 1
  retry.reason = reason
  retry.waiting = true
  set_progress({ message = retry.dropped and "reconnecting" or "connecting" })
  if retry.attempts == NOTIFY_AFTER then
    retry.notified = true
    local message = "starcoder: cannot reach %s (%s); trying again, at most every %d s"
    message = message:format(address(config.options), reason, M.RETRY_MAX_MS / 1000)
    vim.notify(message, vim.log.levels.WARN)
  end
  local generation = retry.generation
  vim.defer_fn(function()
    if generation == retry.generation then
      retry.waiting = false
      connect()
    end
  end, M.retry_delay(retry.attempts))
end

local function on_exit(code, id)
  if id ~= client_id then -- a client stopped on purpose
    return
  end
  client_id = nil
  if config.options.host then
    -- A balancer with no replica up accepts a connection and closes it before initialize.
    retry.dropped = retry.dropped or retry.live == id
    local how = retry.live == id and "the connection ended"
      or "the connection was closed before the server answered"
    if code ~= 0 then -- a pipe (Neovim 0.7) or openssl (TLS)
      how = ("the connection ended (exit code %d, see :LspLog)"):format(code)
    end
    retry_later(how)
  elseif code ~= 0 then
    fail(("the server exited with code %d (see :LspLog)"):format(code))
  end
end

local function on_error(code)
  -- A read error on Neovim's own TCP client leaves the client up with no connection under
  -- it: end it, and on_exit reconnects.
  local client = client_id and vim.lsp.get_client_by_id(client_id)
  if code == vim.lsp.client_errors.READ_ERROR and client and config.options.host then
    compat.stop(client, true)
  end
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
    on_error = on_error,
    on_exit = function(code, _, id)
      -- Not from a libuv callback: on_exit may call Neovim's API.
      vim.schedule(function()
        on_exit(code, id)
      end)
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

--- Starts the client now; returns it, or nil after a failure.
local function start()
  if not (config.options.host and retry.dropped) then
    set_progress({ message = config.options.host and "connecting" or "starting" })
  end
  local ok, id = pcall(compat.start_client, M.lsp_config(config.options))
  if not ok or not id then
    fail("the server could not be started: " .. tostring(ok and "no client" or id))
    return nil
  end
  client_id = id
  return vim.lsp.get_client_by_id(id)
end

--- Calls on_done(err) once a TCP connection to host:port could be made (err nil) or not.
local function probe(host, port, on_done)
  local uv = compat.uv
  local found = uv.getaddrinfo(host, nil, { socktype = "stream" })
  local tcp = uv.new_tcp()
  local addr = found and found[1] and found[1].addr or host
  local ok, err = tcp:connect(addr, port, function(connect_err)
    tcp:close()
    vim.schedule(function()
      on_done(connect_err)
    end)
  end)
  if not ok then
    tcp:close()
    vim.schedule(function()
      on_done(err or "cannot connect")
    end)
  end
end

-- One try at the remote server. The port is checked first: Neovim's own TCP client (0.8 and
-- later) only prints a message when it cannot connect, and its client then never starts nor
-- exits; and a pipe or openssl need not be started for nothing.
connect = function()
  local options = config.options
  local generation = retry.generation
  retry.connecting = true
  if not retry.dropped and retry.attempts == 0 then
    set_progress({ message = "connecting" })
  end
  probe(options.host, options.port, function(err)
    if generation ~= retry.generation then -- stopped meanwhile
      return
    end
    retry.connecting = false
    if err then
      retry_later(tostring(err))
    elseif start() then
      M.attach_all()
    end
  end)
end

--- The running client, started if it is not (and did not fail before). A remote server is
--- connected to in the background: nil until then (wait_client waits).
function M.ensure()
  local client = M.get()
  -- client_id: exiting, on_exit will tell why; connecting, waiting: a try is on its way.
  if client or M.failure or client_id or retry.connecting or retry.waiting then
    return client
  end
  if config.options.host then
    connect()
    return nil
  end
  return start()
end

--- The client, started if need be, waiting (blocking, at most timeout_ms) for a remote
--- server's connection; nil if there is none by then (M.why() says why).
function M.wait_client(timeout_ms)
  local client = M.ensure()
  if client then
    return client
  end
  vim.wait(timeout_ms, function()
    return M.get() ~= nil or M.failure ~= nil or retry.waiting
  end, 20)
  return M.get()
end

function M.stop()
  local client = M.get()
  client_id = nil
  retry.generation = retry.generation + 1
  retry.connecting, retry.waiting = false, false
  if client then
    compat.stop(client)
  end
end

--- Stops the server, forgets a failure (and the tries so far), and attaches a new one to
--- the buffers it serves.
function M.restart()
  M.stop()
  M.failure = nil
  retry.attempts, retry.reason, retry.dropped, retry.notified = 0, nil, false, false
  M.attach_all()
end

--- Attaches the client to every loaded buffer the plugin serves (after a (re)start).
function M.attach_all()
  for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(bufnr) then
      M.attach_buffer(bufnr)
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

-- What attach_all() attaches with: init.lua's, which also turns Neovim's own inline
-- completion on for the new client (builtin = true).
M.attach_buffer = function(bufnr)
  return M.attach(bufnr)
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
