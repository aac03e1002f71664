// The level each stderr line of a spawned server is logged at in the output channel.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { stderrLevel, stderrLogger, type Level } from '../src/serverLog';

test('records keep the level they state', () => {
  const cases: [string, Level][] = [
    ['2026-12-02 04:19:03,123 INFO starcoder_lsp.engine: key/value cache: 8 slots', 'info'],
    ['2026-12-02 04:19:03,123 WARNING jax._src.xla_bridge: An NVIDIA GPU may be present', 'warn'],
    ['2026-12-02 04:19:03,123 DEBUG pygls.protocol: Sending data', 'debug'],
    ['2026-12-02 04:19:03,123 ERROR starcoder_lsp.backend: the model could not be loaded', 'error'],
    ['I0000 00:00:1764649143.123456   12 cpu_client.cc:123] TfrtCpuClient created.', 'info'],
    ['W1202 04:19:03.123456  1234 hlo_pass.cc:56] slow', 'warn'],
    ['E1202 04:19:03.123456  1234 cuda_dnn.cc:8310] Unable to register cuDNN factory', 'error'],
    ['/venv/lib/python3.11/site-packages/x.py:12: UserWarning: deprecated', 'warn'],
    ['WARNING: All log messages before absl::InitializeLog() is called are written to STDERR', 'warn'],
    ['Traceback (most recent call last):', 'error'],
    ['error: no checkpoint directory or hub id models/none', 'error'],
  ];
  for (const [line, level] of cases) {
    assert.equal(stderrLevel(line, 'info'), level, line);
  }
});

test("a record's further lines take its level; lines before any record are info", () => {
  const logged: [Level, string][] = [];
  const log = (level: Level) => (message: string) => void logged.push([level, message]);
  const onLine = stderrLogger({
    debug: log('debug'),
    info: log('info'),
    warn: log('warn'),
    error: log('error'),
  });
  for (const line of [
    'loading',
    'Traceback (most recent call last):',
    '  File "x.py", line 1, in <module>',
    'ValueError: bad',
    '2026-12-02 04:19:03,123 INFO starcoder_lsp.engine: ready',
    '  a second line of that message',
  ]) {
    onLine(line);
  }
  assert.deepEqual(
    logged.map(([level]) => level),
    ['info', 'error', 'error', 'error', 'info', 'info'],
  );
});
