-- Pure functions on suggestion text: no editor state.
local compat = require("starcoder.compat")

local M = {}

--- The next word of `text`, with the whitespace (newlines too) before it: a run of word
--- characters, or else a run of other non-blank characters.
function M.word(text)
  return text:match("^%s*[%w_]+") or text:match("^%s*[^%w_%s]+") or text
end

--- The rest of the current line of `text`, with its newline; if `text` starts with a newline,
--- the line after it.
function M.line(text)
  return text:match("^\n?[^\n]*\n?")
end

--- An LSP InlineCompletionItem as what to insert at the cursor (row, col): the part of its
--- insertText not typed yet, and where the text it replaces ends. `lines` gets buffer lines
--- by 0-based number. nil when the item does not apply at the cursor.
function M.normalize(item, lines, row, col, encoding)
  local insert = item.insertText
  if type(insert) == "table" then -- a snippet (StringValue): shown and inserted as text
    insert = insert.value
  end
  if type(insert) ~= "string" then
    return nil
  end
  local start_row, start_col, end_row, end_col = row, col, row, col
  if item.range then
    local s, e = item.range.start, item.range["end"]
    start_row, end_row = s.line, e.line
    start_col = compat.byte_col(lines(start_row), s.character, encoding)
    end_col = compat.byte_col(lines(end_row), e.character, encoding)
  end
  local before = start_row < row or (start_row == row and start_col <= col)
  local after = end_row > row or (end_row == row and end_col >= col)
  if start_row ~= row or not before or not after then
    return nil
  end
  local typed = lines(row):sub(start_col + 1, col)
  if insert:sub(1, #typed) ~= typed or #insert == #typed then
    return nil
  end
  return {
    text = insert:sub(#typed + 1),
    end_row = end_row,
    end_col = end_col,
    command = item.command,
  }
end

return M
