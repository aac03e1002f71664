-- Options of require("starcoder").setup() and their defaults.
local M = {}

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
  -- multiline = "auto", temperature = 0, fimMode = "spm" }.
  settings = {},

  filetypes = nil, -- nil: every buffer with a file; or a list such as { "python", "lua" }
  auto_trigger = true, -- ask while typing; false: only on keys.next
  debounce_ms = 75,
  -- Neovim >= 0.12: let vim.lsp.inline_completion show and accept the suggestions.
  builtin = false,

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

M.options = vim.deepcopy(M.defaults)

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
    keys = { options.keys, "table" },
    hl_group = { options.hl_group, "string" },
  })
end

function M.set(user)
  local options = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), user or {})
  -- Lists replace the default, they are not merged index by index.
  for _, key in ipairs({ "cmd", "server_args", "filetypes" }) do
    if user and user[key] ~= nil then
      options[key] = user[key]
    end
  end
  check(options)
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
  local init = vim.deepcopy(options.settings)
  local token = options.token or vim.env.STARCODER_LSP_TOKEN
  if token and token ~= "" then
    init.token = token
  end
  -- An empty Lua table would be sent as [] rather than {}.
  return next(init) and init or vim.empty_dict()
end

return M
