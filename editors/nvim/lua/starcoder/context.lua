-- Cross-file context the server cannot see for itself: the files the user visits and the
-- text they yank, sent as `starcoder/context` { uri, text }. The server keeps the last few
-- and quotes the chunks most like the code at the cursor ahead of its prompts; it never reads
-- the disk (it may run on another machine), so a file the user visited and then closed is
-- known to it only from here.
local client = require("starcoder.client")
local compat = require("starcoder.compat")

local M = {}

-- The server keeps this much of each text; sending more only costs the wire.
M.MAX_CHARS = 262144

--- The text to send for a list of lines, at most M.MAX_CHARS bytes.
---@param lines string[]
---@return string
function M.text(lines)
  local text = table.concat(lines, "\n") .. "\n"
  return #text > M.MAX_CHARS and text:sub(1, M.MAX_CHARS) or text
end

--- The buffer's first lines that fit M.MAX_CHARS bytes (at least one): a visit to a 20 MB
--- file copies 256 KB of it, not all of it.
function M.head(bufnr)
  local low, high = 1, vim.api.nvim_buf_line_count(bufnr)
  while low < high do -- the most lines whose bytes fit lie in [low, high]
    local mid = math.floor((low + high + 1) / 2)
    if vim.api.nvim_buf_get_offset(bufnr, mid) <= M.MAX_CHARS then
      low = mid
    else
      high = mid - 1
    end
  end
  return vim.api.nvim_buf_get_lines(bufnr, 0, low, false)
end

--- The URI a yank from the buffer is sent under: the buffer's, with a fragment, so that the
--- server replaces the buffer's last yank and never quotes it in that buffer's own prompts.
function M.yank_uri(bufnr)
  return vim.uri_from_bufnr(bufnr) .. "#yank"
end

--- Whether the buffer holds a file: any file, served or not (a README read beside the code
--- is context too).
local function is_file(bufnr)
  return vim.bo[bufnr].buftype == "" and vim.api.nvim_buf_get_name(bufnr) ~= ""
end

local function send(bufnr, uri, text)
  local c = client.get()
  if c and c.initialized and is_file(bufnr) and text:find("%S") then
    compat.notify(c, "starcoder/context", { uri = uri, text = text })
  end
end

--- Sends the buffer's whole text: the user visited the file.
function M.visited(bufnr)
  send(bufnr, vim.uri_from_bufnr(bufnr), M.text(M.head(bufnr)))
end

--- Sends what was yanked (or cut) in the buffer (`v:event` of TextYankPost).
function M.yanked(bufnr, event)
  if event.operator == "y" or event.operator == "d" or event.operator == "c" then
    send(bufnr, M.yank_uri(bufnr), M.text(event.regcontents))
  end
end

--- Autocommands that send visited files (BufEnter, after a write too) and yanks.
function M.setup(group)
  vim.api.nvim_create_autocmd({ "BufEnter", "BufWritePost" }, {
    group = group,
    callback = function(event)
      -- After attach (the same BufEnter attaches a new buffer): the client must know it.
      vim.schedule(function()
        if vim.api.nvim_buf_is_valid(event.buf) then
          M.visited(event.buf)
        end
      end)
    end,
  })
  vim.api.nvim_create_autocmd("TextYankPost", {
    group = group,
    callback = function(event)
      M.yanked(event.buf, vim.v.event)
    end,
  })
end

return M
