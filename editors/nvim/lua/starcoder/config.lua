-- Options of require("starcoder").setup(), their defaults and their checks; the server's
-- settings the plugin knows, and the command line and initializationOptions they make.
local M = {}

--- Insert-mode keys; false leaves a key unmapped.
---@class starcoder.Keys
---@field accept? string|false accept the whole suggestion
---@field accept_word? string|false accept its next word
---@field accept_line? string|false accept the rest of its line
---@field dismiss? string|false hide it
---@field next? string|false ask again, or show the next item

--- The options of require("starcoder").setup(), each optional (M.defaults has the defaults).
---@class starcoder.Options
---@field cmd? string[] the whole command line of a local server, used as it is
---@field model? string checkpoint directory or hub id (the server's --model)
---@field server_args? string[] more arguments for `starcoder-lsp serve`
---@field host? string a remote `starcoder-lsp serve --tcp`: then nothing is spawned
---@field port? number the remote server's port
---@field token? string the remote server's --token; default: $STARCODER_LSP_TOKEN
---@field tls? boolean reach the remote server through `openssl s_client`
---@field tls_ca? string the CA (or self-signed certificate) to trust
---@field settings? table<string, boolean|number|string> the server's (M.server_settings)
---@field filetypes? string[] nil: every buffer with a file
---@field auto_trigger? boolean ask while typing; false: only on keys.next
---@field debounce_ms? number wait after the last keystroke before asking
---@field builtin? boolean Neovim >= 0.12: vim.lsp.inline_completion shows the suggestions
---@field context? boolean send visited files and yanks to the server as cross-file context
---@field keys? starcoder.Keys
---@field hl_group? string highlight group of the suggestion, linked to Comment

---@type starcoder.Options
M.defaults = {
  -- The server to spawn: nil means { "starcoder-lsp", "serve", "--stdio" } followed by
  -- "--model <model>" and server_args. A list given here is used as it is.
  cmd = nil,
  model = nil, -- checkpoint directory or Hugging Face hub id (the server's --model)
  server_args = {}, -- more arguments for `starcoder-lsp serve`, e.g. { "--mesh", "1x8" }

  -- A remote server (`starcoder-lsp serve --tcp`): when host is set, nothing is spawned.
  host = nil,
  port = 2087,
  token = nil, -- default: $STARCODER_LSP_TOKEN
  tls = false, -- Neovim cannot speak TLS itself: this runs `openssl s_client` as a pipe
  tls_ca = nil, -- CA file that signed the server's certificate (self-signed: the cert itself)

  -- The server's settings (initializationOptions), e.g. { maxNewTokens = 64,
  -- multiline = "auto", temperature = 0, fimMode = "spm" }: see M.server_settings.
  settings = {},

  filetypes = nil, -- nil: every buffer with a file; or a list such as { "python", "lua" }
  auto_trigger = true, -- ask while typing; false: only on keys.next
  debounce_ms = 75,
  -- Neovim >= 0.12: let vim.lsp.inline_completion show and accept the suggestions.
  builtin = false,
  -- Send the files you visit and the text you yank to the server (`starcoder/context`), which
  -- quotes the chunks most like the code at the cursor ahead of its prompts.
  context = true,

  -- Insert-mode keys; false leaves a key unmapped. Where no suggestion is shown, each key
  -- does what it did before.
  keys = {
    accept = "<Tab>",
    accept_word = "<M-Right>",
    accept_line = "<M-C-Right>",
    dismiss = "<C-]>",
    next = "<M-]>",
  },
  hl_group = "StarcoderSuggestion", -- linked to Comment unless your colorscheme sets it
}

---@type starcoder.Options
M.options = vim.deepcopy(M.defaults)

--- The server's settings (starcoder_lsp/settings.py), by wire name: the Lua type of each.
--- "number?" may also be vim.NIL (JSON null: the server's default). The server checks the
--- ranges; tests/test_settings_parity.py checks this table against the server's schema.
M.server_settings = {
  enabled = "boolean",
  maxNewTokens = "number",
  temperature = "number",
  topP = "number",
  fimMode = "string?",
  prefixTokens = "number?",
  suffixTokens = "number?",
  multiline = "string",
  minChars = "number",
  filename = "boolean",
  crossFileContext = "boolean",
  crossFileTokens = "number?",
  crossFileSources = "string",
}

--- What else the server reads from initializationOptions, at initialize only.
M.initialize_options = {
  completionFallback = "boolean", -- a textDocument/completion provider too
  token = "string", -- better: the token option
}

--- Whether `value` is of `kind` ("number", "number?", ...).
local function has_kind(value, kind)
  local name, nullable = kind:match("^(%a+)(%??)$")
  return type(value) == name or (nullable == "?" and value == vim.NIL)
end

--- The settings the server will be sent: `settings` without unknown keys and values of the
--- wrong type, each dropped with a warning (the server then uses its default for it), so
--- that one mistake does not make the server refuse the rest.
---@param settings table<string, any>
---@return table<string, boolean|number|string>
function M.check_settings(settings)
  local checked, problems = {}, {}
  for key, value in pairs(settings) do
    local kind = M.server_settings[key] or M.initialize_options[key]
    if type(key) ~= "string" or not kind then
      problems[#problems + 1] = ("unknown setting %s"):format(vim.inspect(key))
    elseif not has_kind(value, kind) then
      local expected = kind:gsub("%?$", " or vim.NIL")
      local given = value == vim.NIL and "vim.NIL" or vim.inspect(value)
      problems[#problems + 1] = ("%s must be a %s, not %s"):format(key, expected, given)
    else
      checked[key] = value
    end
  end
  if #problems > 0 then
    table.sort(problems)
    local message = "starcoder: settings ignored: " .. table.concat(problems, "; ")
    vim.notify(message, vim.log.levels.WARN)
  end
  return checked
end

local function check(options)
  vim.validate({
    cmd = { options.cmd, "table", true },
    model = { options.model, "string", true },
    server_args = { options.server_args, "table" },
    host = { options.host, "string", true },
    port = { options.port, "number" },
    token = { options.token, "string", true },
    tls = { options.tls, "boolean" },
    tls_ca = { options.tls_ca, "string", true },
    settings = { options.settings, "table" },
    filetypes = { options.filetypes, "table", true },
    auto_trigger = { options.auto_trigger, "boolean" },
    debounce_ms = { options.debounce_ms, "number" },
    builtin = { options.builtin, "boolean" },
    context = { options.context, "boolean" },
    keys = { options.keys, "table" },
    hl_group = { options.hl_group, "string" },
  })
end

--- The options: the defaults, with `user`'s over them; an option of the wrong type is an
--- error, a wrong server setting only a warning (see M.check_settings).
---@param user starcoder.Options|nil
---@return starcoder.Options
function M.set(user)
  local options = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), user or {})
  -- Lists replace the default, they are not merged index by index.
  for _, key in ipairs({ "cmd", "server_args", "filetypes" }) do
    if user and user[key] ~= nil then
      options[key] = user[key]
    end
  end
  check(options)
  options.settings = M.check_settings(options.settings)
  M.options = options
  return options
end

--- The command line that starts a local server.
function M.command(options)
  if options.cmd then
    return options.cmd
  end
  local cmd = { "starcoder-lsp", "serve", "--stdio" }
  if options.model then
    vim.list_extend(cmd, { "--model", options.model })
  end
  return vim.list_extend(cmd, options.server_args)
end

--- initializationOptions: the settings, plus the token a remote server asks for.
function M.init_options(options)
  -- A shallow copy: the values are plain (vim.NIL, which Neovim 0.7 cannot deepcopy, too).
  local init = vim.tbl_extend("force", {}, options.settings)
  local token = options.token or vim.env.STARCODER_LSP_TOKEN
  if token and token ~= "" then
    init.token = token
  end
  -- An empty Lua table would be sent as [] rather than {}.
  return next(init) and init or vim.empty_dict()
end

return M
