-- Commands; the plugin itself starts with require("starcoder").setup({...}).
if vim.g.loaded_starcoder then
  return
end
vim.g.loaded_starcoder = true

local command = vim.api.nvim_create_user_command

command("StarcoderDocstring", function()
  require("starcoder").docstring()
end, { desc = "Generate a docstring for the function or class at the cursor" })

command("StarcoderToggle", function()
  require("starcoder").toggle()
end, { desc = "Turn starcoder suggestions on or off" })

command("StarcoderRestart", function()
  require("starcoder").restart()
end, { desc = "Restart the starcoder-lsp server" })

command("StarcoderStats", function()
  local stats, err = require("starcoder").stats()
  if stats then
    print(vim.inspect(stats))
  else
    vim.notify("starcoder: " .. tostring(err), vim.log.levels.ERROR)
  end
end, { desc = "Show the server's counters and latencies" })
