-- Draws a suggestion as ghost text: extmarks, never buffer text.
--
-- Neovim >= 0.10 draws the first line between characters (inline virtual text); before that,
-- the first line is drawn over the rest of the cursor line (overlay) together with what
-- that rest becomes, as the buffer will read once the suggestion is accepted. Further
-- lines are virtual lines below the cursor line.
local compat = require("starcoder.compat")

local M = {}

local ns = vim.api.nvim_create_namespace("starcoder.ghost")

local function width(s)
  return vim.fn.strdisplaywidth(s)
end

-- Drawn instead of the configured group where that group looks like plain text.
M.fallback_group = "StarcoderSuggestionTerm"

local CTERM_ATTRIBUTES = { "bold", "italic", "reverse", "underline", "undercurl", "strikethrough" }

--- Whether `group` (after links) looks different from plain text in a terminal that is not
--- using GUI colours: a foreground, a background or an attribute of its own.
local function has_cterm_look(group)
  local id = vim.fn.synIDtrans(vim.fn.hlID(group))
  if vim.fn.synIDattr(id, "fg", "cterm") ~= "" or vim.fn.synIDattr(id, "bg", "cterm") ~= "" then
    return true
  end
  for _, attribute in ipairs(CTERM_ATTRIBUTES) do
    if vim.fn.synIDattr(id, attribute, "cterm") == "1" then
      return true
    end
  end
  return false
end

--- The highlight group to draw a suggestion with: `group`, unless Neovim uses terminal
--- colours ('notermguicolors') and `group` has none, as Comment in the default colour
--- scheme of Neovim 0.10 and later: then the suggestion would look like code, and the
--- fallback group (grey, ctermfg=8) is drawn instead.
function M.group(group)
  if vim.o.termguicolors or has_cterm_look(group) then
    return group
  end
  return M.fallback_group
end

-- Virtual text shows a tab as one cell: spell it out as spaces.
local function expand_tabs(chunks)
  local spaces = string.rep(" ", vim.bo.tabstop)
  for _, chunk in ipairs(chunks) do
    chunk[1] = chunk[1]:gsub("\t", spaces)
  end
  return chunks
end

--- The extmark options showing `text` at (row, col), where the text replaces the buffer up
--- to (end_row, end_col).
function M.marks(line, row, col, text, end_row, end_col, hl)
  local lines = vim.split(text, "\n", { plain = true })
  local replaced, tail
  if end_row == row then
    replaced, tail = line:sub(col + 1, end_col), line:sub(end_col + 1)
  else -- the replaced range goes past this line: show the whole rest as replaced
    replaced, tail = line:sub(col + 1), ""
  end

  local virt_lines = {}
  for i = 2, #lines do
    virt_lines[#virt_lines + 1] = { { lines[i], hl } }
  end
  if #lines > 1 and tail ~= "" then
    table.insert(virt_lines[#virt_lines], { tail, hl })
  end

  local first = lines[1]
  local opts = { virt_lines = #virt_lines > 0 and virt_lines or nil, hl_mode = "combine" }
  if compat.inline_virt_text and #lines == 1 and vim.endswith(first, replaced) then
    -- The replaced text (auto-closed brackets) stays where it is, after the ghost text.
    opts.virt_text = { { first:sub(1, #first - #replaced), hl } }
    opts.virt_text_pos = "inline"
  elseif compat.inline_virt_text and replaced .. tail == "" then
    opts.virt_text = { { first, hl } }
    opts.virt_text_pos = "inline"
  else
    local shown = first .. (#lines == 1 and tail or "")
    local hidden = width(replaced .. tail) - width(shown)
    opts.virt_text = { { shown .. string.rep(" ", math.max(hidden, 0)), hl } }
    opts.virt_text_pos = "overlay"
  end
  return opts
end

function M.show(bufnr, row, col, text, end_row, end_col, hl)
  M.clear(bufnr)
  local line = vim.api.nvim_buf_get_lines(bufnr, row, row + 1, true)[1]
  local opts = M.marks(line, row, col, text, end_row, end_col, hl)
  opts.id = 1
  expand_tabs(opts.virt_text)
  for _, virt_line in ipairs(opts.virt_lines or {}) do
    expand_tabs(virt_line)
  end
  vim.api.nvim_buf_set_extmark(bufnr, ns, row, col, opts)
end

function M.clear(bufnr)
  if vim.api.nvim_buf_is_valid(bufnr) then
    vim.api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  end
end

--- What is drawn in the buffer (for tests and statuslines): the ghost text, lines joined
--- with "\n", or nil.
function M.shown(bufnr)
  local marks = vim.api.nvim_buf_get_extmarks(bufnr, ns, 0, -1, { details = true })
  if #marks == 0 then
    return nil
  end
  local details = marks[1][4]
  local parts = {}
  for _, chunk in ipairs(details.virt_text or {}) do
    parts[#parts + 1] = chunk[1]
  end
  local lines = { table.concat(parts) }
  for _, virt_line in ipairs(details.virt_lines or {}) do
    local chunks = {}
    for _, chunk in ipairs(virt_line) do
      chunks[#chunks + 1] = chunk[1]
    end
    lines[#lines + 1] = table.concat(chunks)
  end
  return table.concat(lines, "\n")
end

M.namespace = ns

return M
