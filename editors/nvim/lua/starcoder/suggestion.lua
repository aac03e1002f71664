-- Ghost-text suggestions while typing: debounced requests, the suggestion shown, typing
-- through it, and accepting all of it, a word or a line.
--
-- The shown suggestion is held by two extmarks that move with edits: `anchor` at the cursor
-- (where the text goes in) and `finish` where the text it replaces ends (after the cursor
-- when the suggestion covers auto-closed brackets).
local client = require("starcoder.client")
local compat = require("starcoder.compat")
local config = require("starcoder.config")
local render = require("starcoder.render")
local text = require("starcoder.text")

local api = vim.api
local M = {}

local AUTOMATIC, INVOKED = 2, 1 -- InlineCompletionTriggerKind
local ns = api.nvim_create_namespace("starcoder.anchors")

local timer = compat.uv.new_timer()
local pending = nil -- the request on its way: { client = c, id = n }
local current = nil -- the suggestion shown
local seen = {} -- the buffer state the plugin last reacted to

M.enabled = true

local function cursor()
  local pos = api.nvim_win_get_cursor(0)
  return pos[1] - 1, pos[2]
end

local function in_insert_mode()
  local mode = api.nvim_get_mode().mode
  return mode:sub(1, 1) == "i"
end

local function buffer_line(bufnr)
  return function(row)
    return api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ""
  end
end

local function remember(bufnr)
  local row, col = cursor()
  seen = { bufnr = bufnr, tick = api.nvim_buf_get_changedtick(bufnr), row = row, col = col }
end

--- Where the shown suggestion's "anchor" or "finish" mark is now: row, col.
local function position(mark)
  local pos = api.nvim_buf_get_extmark_by_id(current.bufnr, ns, current[mark], {})
  return pos[1], pos[2]
end

--- Puts the "anchor" (which stays before text inserted at it) or the "finish" mark (which
--- moves after such text) at row, col.
local function place(mark, row, col)
  local opts = { id = current[mark], right_gravity = mark == "finish" }
  current[mark] = api.nvim_buf_set_extmark(current.bufnr, ns, row, col, opts)
end

local function draw()
  local row, col = position("anchor")
  local end_row, end_col = position("finish")
  local hl = render.group(config.options.hl_group)
  render.show(current.bufnr, row, col, current.text, end_row, end_col, hl)
end

local function clear()
  if current then
    render.clear(current.bufnr)
    if api.nvim_buf_is_valid(current.bufnr) then
      api.nvim_buf_clear_namespace(current.bufnr, ns, 0, -1)
    end
    current = nil
  end
end

local function cancel()
  timer:stop()
  if pending then
    if not compat.is_stopped(pending.client) then
      compat.cancel_request(pending.client, pending.id)
    end
    pending = nil
  end
end

--- Shows items[index] (already normalized) at the cursor.
local function show(bufnr, client_id, items, index)
  clear()
  local row, col = cursor()
  local item = items[index]
  current = {
    bufnr = bufnr,
    client_id = client_id,
    items = items,
    index = index,
    text = item.text,
    command = item.command,
  }
  place("anchor", row, col)
  place("finish", item.end_row, item.end_col)
  draw()
end

--- Shows the first of the server's items that applies at the cursor.
local function present(bufnr, c, raw_items)
  local row, col = cursor()
  local items = {}
  for _, item in ipairs(raw_items) do
    items[#items + 1] = text.normalize(item, buffer_line(bufnr), row, col, compat.encoding(c))
  end
  if #items > 0 then
    show(bufnr, c.id, items, 1)
  end
end

--- Draws the shown suggestion again (the colours changed: 'termguicolors', colour scheme).
function M.redraw()
  if current and api.nvim_buf_is_valid(current.bufnr) then
    draw()
  end
end

--- Shows InlineCompletionItems as if the server had sent them (for tests).
function M._show_items(raw_items)
  local bufnr = api.nvim_get_current_buf()
  present(bufnr, client.for_buffer(bufnr), raw_items)
end

function M.visible()
  return current ~= nil and current.bufnr == api.nvim_get_current_buf()
end

--- The text the shown suggestion would insert at the cursor, or nil.
function M.current_text()
  return M.visible() and current.text or nil
end

function M.dismiss()
  cancel()
  clear()
end

--- Asks the server now. trigger: AUTOMATIC (typing) or INVOKED (asked for).
function M.request(trigger)
  cancel()
  local bufnr = api.nvim_get_current_buf()
  local c = client.for_buffer(bufnr)
  if not c or not M.enabled or not in_insert_mode() then
    return
  end
  local row, col = cursor()
  local lines = buffer_line(bufnr)
  local encoding = compat.encoding(c)
  local params = {
    textDocument = { uri = vim.uri_from_bufnr(bufnr) },
    position = { line = row, character = compat.character(lines(row), col, encoding) },
    context = { triggerKind = trigger or AUTOMATIC },
  }
  local tick = api.nvim_buf_get_changedtick(bufnr)
  local this = { client = c }
  local function on_result(err, result)
    if pending ~= this then
      return
    end
    pending = nil
    local now_row, now_col = cursor()
    local stale = api.nvim_get_current_buf() ~= bufnr
      or api.nvim_buf_get_changedtick(bufnr) ~= tick
      or now_row ~= row
      or now_col ~= col
    if not err and type(result) == "table" and not stale and in_insert_mode() then
      present(bufnr, c, result.items or result)
    end
  end
  local ok, id = compat.request(c, "textDocument/inlineCompletion", params, on_result, bufnr)
  if ok then
    this.id = id
    pending = this
  end
end

local request_automatic = vim.schedule_wrap(function()
  M.request(AUTOMATIC)
end)

local function schedule()
  cancel()
  timer:start(config.options.debounce_ms, 0, request_automatic)
end

--- After an edit: whether the text typed at the anchor is the start of the suggestion. If
--- so, the suggestion shrinks by it and stays.
local function typed_through(row, col)
  local anchor_row, anchor_col = position("anchor")
  local end_row, end_col = position("finish")
  local ahead = row > anchor_row or (row == anchor_row and col > anchor_col)
  local within = end_row > row or (end_row == row and end_col >= col)
  if not ahead or not within then
    return false
  end
  local typed = api.nvim_buf_get_text(current.bufnr, anchor_row, anchor_col, row, col, {})
  typed = table.concat(typed, "\n")
  if current.text:sub(1, #typed) ~= typed then
    return false
  end
  current.text = current.text:sub(#typed + 1)
  if current.text == "" then
    clear()
    return true
  end
  place("anchor", row, col)
  draw()
  return true
end

--- TextChangedI, TextChangedP and CursorMovedI: follow typing, else dismiss and ask again.
function M.on_change()
  local bufnr = api.nvim_get_current_buf()
  local row, col = cursor()
  local tick = api.nvim_buf_get_changedtick(bufnr)
  if seen.bufnr == bufnr and seen.tick == tick and seen.row == row and seen.col == col then
    return
  end
  local edited = seen.bufnr ~= bufnr or seen.tick ~= tick
  remember(bufnr)
  if not client.for_buffer(bufnr) then
    return
  end
  if edited and current and current.bufnr == bufnr and typed_through(row, col) then
    if current then -- typed as suggested: the rest stays shown, without a new request
      return
    end
  else
    M.dismiss()
  end
  if edited and M.enabled and config.options.auto_trigger then
    schedule()
  end
end

local function execute(client_id, command, bufnr)
  local c = vim.lsp.get_client_by_id(client_id)
  if c and command then
    local params = { command = command.command, arguments = command.arguments }
    compat.request(c, "workspace/executeCommand", params, function() end, bufnr)
  end
end

--- Inserts the whole suggestion, replacing what its range covers, and tells the server.
local function accept_all()
  local bufnr, client_id, command = current.bufnr, current.client_id, current.command
  local row, col = position("anchor")
  local end_row, end_col = position("finish")
  local lines = vim.split(current.text, "\n", { plain = true })
  M.dismiss()
  api.nvim_buf_set_text(bufnr, row, col, end_row, end_col, lines)
  local last_col = (#lines == 1 and col or 0) + #lines[#lines]
  api.nvim_win_set_cursor(0, { row + #lines, last_col })
  remember(bufnr)
  execute(client_id, command, bufnr)
end

--- Inserts the start of the suggestion at the cursor; the rest stays shown. Once the part
--- reaches the end of the suggestion's first line, it also replaces what the suggestion
--- replaces (auto-closed brackets after the cursor, which that line ends with).
local function accept_part(part)
  local row, col = position("anchor")
  local end_row, end_col = row, col
  local replaces = #part >= #current.text:match("^[^\n]*")
  if replaces then
    end_row, end_col = position("finish")
  end
  local lines = vim.split(part, "\n", { plain = true })
  api.nvim_buf_set_text(current.bufnr, row, col, end_row, end_col, lines)
  local new_row = row + #lines - 1
  local new_col = (#lines == 1 and col or 0) + #lines[#lines]
  api.nvim_win_set_cursor(0, { new_row + 1, new_col })
  if replaces then -- nothing after the cursor is replaced any more
    place("finish", new_row, new_col)
  end
  typed_through(new_row, new_col)
  remember(current.bufnr)
end

--- Accepts the shown suggestion: kind "all" (default), "word" or "line". Returns whether
--- there was one.
function M.accept(kind)
  if not M.visible() then
    return false
  end
  local part = current.text
  if kind == "word" then
    part = text.word(current.text)
  elseif kind == "line" then
    part = text.line(current.text)
  end
  if part == current.text then
    accept_all()
  else
    accept_part(part)
  end
  return true
end

--- Shows the next item the server gave, or asks the server again.
function M.next()
  if M.visible() and #current.items > 1 then
    local bufnr, client_id, items = current.bufnr, current.client_id, current.items
    show(bufnr, client_id, items, current.index % #items + 1)
    return
  end
  M.dismiss()
  M.request(INVOKED)
end

function M.setup_autocmds()
  local group = api.nvim_create_augroup("starcoder.suggestion", { clear = true })
  api.nvim_create_autocmd({ "TextChangedI", "TextChangedP", "CursorMovedI" }, {
    group = group,
    callback = M.on_change,
  })
  api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = group,
    callback = function()
      seen = {}
      M.dismiss()
    end,
  })
end

return M
