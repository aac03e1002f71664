// @ts-check
// A person's session in a real VS Code: code-server (the VS Code workbench, served to a
// browser) with the packaged extension installed, driven through Debian's Chromium by
// playwright-core. tests/test_vscode_real.py prepares the workspace and the settings, runs
// this script with Node 24 and checks what it reports against what the server sent.
//
//   node drive.mjs CONFIG.json
//
// CONFIG: { codeServer, vsix, userDataDir, extensionsDir, workspace, screenshots, results,
//           chromium, wireLog, bracketCalls }; or, with flow: 'reconnect' and markers (a
//           folder), a remote server's connection lost and made again (see reconnect()).
// Each step leaves a screenshot in `screenshots`; a failed step also leaves failed-<step>.png,
// and the script exits 1 with the reason on stderr.
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { chromium } from 'playwright-core';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
/** @type {Record<string, any>} */
const results = { steps: {} };
let shot = 0;

/** @param {number} ms */
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Polls `check` until it returns something truthy; fails with `what` after `timeout` ms.
 * @template T
 * @param {string} what
 * @param {() => Promise<T>} check
 * @param {number} [timeout]
 * @returns {Promise<NonNullable<T>>}
 */
async function waitFor(what, check, timeout = 30000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) {
      return /** @type {NonNullable<T>} */ (value);
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeout / 1000} s waiting for ${what}`);
    }
    await sleep(100);
  }
}

function installExtension() {
  const done = spawnSync(
    process.execPath,
    [
      config.codeServer,
      '--user-data-dir',
      config.userDataDir,
      '--extensions-dir',
      config.extensionsDir,
      '--install-extension',
      config.vsix,
    ],
    { encoding: 'utf8', timeout: 120000 },
  );
  if (done.status !== 0 || !/successfully installed/.test(done.stdout)) {
    throw new Error(`installing ${config.vsix} failed:\n${done.stdout}\n${done.stderr}`);
  }
}

/** Starts code-server on a free port; resolves to its URL and process. */
function startCodeServer() {
  const args = [
    config.codeServer,
    '--auth',
    'none',
    '--bind-addr',
    '127.0.0.1:0',
    '--user-data-dir',
    config.userDataDir,
    '--extensions-dir',
    config.extensionsDir,
    '--disable-telemetry',
    '--disable-update-check',
    '--disable-workspace-trust',
    '--disable-getting-started-override',
    config.workspace,
  ];
  const log = fs.openSync(path.join(config.screenshots, 'code-server.log'), 'w');
  const server = spawn(process.execPath, args, { detached: true, stdio: ['ignore', 'pipe', log] });
  // Its own process group, ended at the end; the test ends it too if this script is killed.
  fs.writeFileSync(path.join(config.userDataDir, 'code-server.pid'), String(server.pid));
  return new Promise((resolve, reject) => {
    let seen = '';
    const timer = setTimeout(() => reject(new Error(`code-server did not start:\n${seen}`)), 60000);
    server.stdout.on('data', (data) => {
      fs.writeSync(log, data);
      seen += data;
      const match = /HTTP server listening on (http:\/\/\S+)/.exec(seen);
      if (match) {
        clearTimeout(timer);
        resolve({ url: match[1].replace(/\/$/, ''), server });
      }
    });
    server.on('exit', (code) => reject(new Error(`code-server exited (${code}):\n${seen}`)));
  });
}

/** @param {import('playwright-core').Page} page @param {string} name */
async function screenshot(page, name) {
  shot += 1;
  const file = path.join(config.screenshots, `${String(shot).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file });
  return file;
}

/**
 * Runs one step, timed; on failure leaves failed-<name>.png and rethrows with the step's name.
 * @param {import('playwright-core').Page} page @param {string} name @param {() => Promise<void>} body
 */
async function step(page, name, body) {
  const started = Date.now();
  try {
    await body();
  } catch (error) {
    await page.screenshot({ path: path.join(config.screenshots, `failed-${name}.png`) }).catch(() => {});
    throw new Error(`step "${name}": ${error instanceof Error ? error.message : error}`);
  }
  results.steps[name] = (Date.now() - started) / 1000;
  await screenshot(page, name);
}

/**
 * The inline completion items the server has sent so far (the first of each non-empty
 * answer), read from the copy of its stdout that tests/lsp_tee.py keeps.
 * @returns {{insertText: string, range: {start: {line: number, character: number}, end: {line: number, character: number}}}[]}
 */
function wireAnswers() {
  let wire = fs.existsSync(config.wireLog) ? fs.readFileSync(config.wireLog) : Buffer.alloc(0);
  const items = [];
  for (;;) {
    const head = wire.indexOf('\r\n\r\n');
    if (head < 0) {
      break;
    }
    const length = Number(/content-length: *(\d+)/i.exec(wire.subarray(0, head).toString('ascii'))?.[1]);
    const body = wire.subarray(head + 4, head + 4 + length);
    if (body.length < length) {
      break;
    }
    const message = JSON.parse(body.toString('utf8'));
    const first = message.result?.items?.[0];
    if (first && typeof first.insertText === 'string') {
      items.push(first);
    }
    wire = wire.subarray(head + 4 + length);
  }
  return items;
}

/** @param {import('playwright-core').Page} page */
const ghostText = (page) =>
  page.evaluate(() => {
    const editor = document.querySelector('.editor-group-container.active .monaco-editor');
    const parts = editor ? [...editor.querySelectorAll('.ghost-text-decoration, .ghost-text')] : [];
    return parts.map((part) => part.textContent ?? '').join('');
  });

/** @param {import('playwright-core').Page} page */
const statusLabel = (page) =>
  page.evaluate(() => {
    const item = [...document.querySelectorAll('.statusbar-item')].find((element) =>
      /StarCoder/.test(element.getAttribute('aria-label') ?? element.textContent ?? ''),
    );
    return item ? (item.getAttribute('aria-label') ?? '') : '';
  });

/** Opens `name` from the workspace with Quick Open. @param {import('playwright-core').Page} page @param {string} name */
async function open(page, name) {
  await page.keyboard.press('Control+P');
  await page.locator('.quick-input-widget input').waitFor();
  await page.keyboard.type(name);
  await waitFor(`${name} in Quick Open`, () =>
    page.locator('.quick-input-list .monaco-list-row', { hasText: name }).count(),
  );
  await page.keyboard.press('Enter');
  await page.locator(`.tab.active[aria-label^="${name}"]`).waitFor();
  await page.locator('.editor-group-container.active .monaco-editor textarea').focus();
}

/** Moves the cursor to the end of 1-based `line`. @param {import('playwright-core').Page} page @param {number} line */
async function goToLineEnd(page, line) {
  await page.keyboard.press('Control+G');
  await page.locator('.quick-input-widget input').waitFor();
  await page.keyboard.type(String(line));
  await page.keyboard.press('Enter');
  await page.keyboard.press('End');
}

/**
 * Types `keys` one at a time until a suggestion is drawn; returns it and what was typed.
 * @param {import('playwright-core').Page} page @param {string} keys
 */
async function typeUntilGhostText(page, keys) {
  let typed = '';
  for (const key of keys) {
    await page.keyboard.type(key);
    typed += key;
    try {
      const ghost = await waitFor('ghost text', () => ghostText(page), 8000);
      return { ghost, typed };
    } catch {
      continue;
    }
  }
  throw new Error(`no ghost text after typing ${JSON.stringify(keys)}`);
}

/**
 * Accepts the shown suggestion with Tab. VS Code may show the next one at once: what was shown
 * has gone (or changed) when Tab was taken; Escape then hides the next.
 * @param {import('playwright-core').Page} page
 */
async function acceptWithTab(page) {
  const shown = await ghostText(page);
  await page.keyboard.press('Tab');
  await waitFor('the suggestion to be taken', async () => (await ghostText(page)) !== shown, 10000);
  await page.keyboard.press('Escape');
}

/** @param {import('playwright-core').Page} page @param {string} file */
async function saveAndRead(page, file) {
  await page.keyboard.press('Control+S');
  await waitFor('the tab saved', async () => !(await page.locator('.tab.active.dirty').count()), 10000);
  return fs.readFileSync(path.join(config.workspace, file), 'utf8');
}

/** @param {import('playwright-core').Page} page @param {string} title */
async function runCommand(page, title) {
  await page.keyboard.press('F1');
  await page.locator('.quick-input-widget input').waitFor();
  await page.keyboard.type(title);
  await waitFor(`"${title}" in the command palette`, () =>
    page.locator('.quick-input-list .monaco-list-row', { hasText: title }).count(),
  );
  await page.keyboard.press('Enter');
}

/**
 * Touches `name` in config.markers: tests/test_replicas.py waits for these to kill a replica
 * and to bring the other one in.
 * @param {string} name
 */
function mark(name) {
  fs.writeFileSync(path.join(config.markers, name), '');
}

/**
 * A remote server behind a load balancer (tests/test_replicas.py): a suggestion; the server's
 * replica is killed and none takes the connection for a while: the status bar item says
 * reconnecting; another is let in: ready again, and suggestions again; and again after
 * "Restart the server".
 * @param {import('playwright-core').Page} page
 */
async function reconnect(page) {
  await step(page, 'remote-ghost-text', async () => {
    await open(page, 'greeting.py');
    await goToLineEnd(page, 6);
    results.before = await typeUntilGhostText(page, 'rxyzqwvk');
  });
  await page.keyboard.press('Escape');
  mark('suggested');

  await step(page, 'reconnecting', async () => {
    await waitFor(
      'the status bar item to say reconnecting',
      async () => /reconnecting/.test(await statusLabel(page)),
      60000,
    );
    results.reconnecting = await statusLabel(page);
  });
  mark('reconnecting');

  await step(page, 'reconnected', async () => {
    await waitFor(
      'the status bar item to say ready again',
      async () => /ready/.test(await statusLabel(page)),
      60000,
    );
    results.reconnected = await statusLabel(page);
  });

  await step(page, 'ghost-text-again', async () => {
    results.after = await typeUntilGhostText(page, 'abcdefgh');
  });
  await page.keyboard.press('Escape');

  // Restarting by hand stops the remote client cleanly and connects again.
  await step(page, 'restarted', async () => {
    await runCommand(page, 'StarCoder: Restart the server');
    await waitFor(
      'the status bar item to say ready',
      async () => /ready/.test(await statusLabel(page)),
      60000,
    );
    results.restarted = await typeUntilGhostText(page, 'ijklmnop');
  });
  // Messages VS Code showed meanwhile (their text, as notifications toasts show it).
  results.notifications = await page.evaluate(() =>
    [...document.querySelectorAll('.notification-toast .notification-list-item-message')].map(
      (element) => element.textContent ?? '',
    ),
  );
}

async function main() {
  fs.mkdirSync(config.screenshots, { recursive: true });
  let started = Date.now();
  installExtension();
  results.steps.install = (Date.now() - started) / 1000;
  started = Date.now();
  const { url, server } = await startCodeServer();
  const browser = await chromium.launch({
    executablePath: config.chromium,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1200, height: 700 } });
    await page.goto(`${url}/?folder=${encodeURIComponent(config.workspace)}`);

    await step(page, 'workbench', async () => {
      await page.locator('.monaco-workbench').waitFor({ timeout: 60000 });
      await waitFor('the StarCoder status bar item', () => statusLabel(page), 60000);
    });
    results.steps.startup = (Date.now() - started) / 1000;

    await step(page, 'status-ready', async () => {
      await waitFor(
        'the status bar item to say ready',
        async () => /ready/.test(await statusLabel(page)),
        120000,
      );
      results.status = await statusLabel(page);
    });

    if (config.flow === 'reconnect') {
      await reconnect(page);
      return;
    }

    await step(page, 'ghost-text', async () => {
      await open(page, 'greeting.py');
      await goToLineEnd(page, 6);
      const answers = wireAnswers().length;
      results.typing = await typeUntilGhostText(page, 'rxyzqwvk');
      results.typing.item = wireAnswers().slice(answers).pop();
    });

    await step(page, 'accepted', async () => {
      await acceptWithTab(page);
      results.typing.saved = await saveAndRead(page, 'greeting.py');
    });

    await step(page, 'bracket-ghost-text', async () => {
      await open(page, 'brackets.py');
      // The random test model does not always close the bracket: try a few calls, each on
      // the last line, until the server's answer covers the ")" VS Code added by itself.
      for (const call of config.bracketCalls) {
        await goToLineEnd(page, 1000);
        const answers = wireAnswers().length;
        await page.keyboard.type(call); // the "(" makes VS Code add ")" after the cursor
        try {
          await waitFor('ghost text', () => ghostText(page), 8000);
        } catch {
          continue; // nothing worth showing here
        }
        const item = wireAnswers().slice(answers).pop();
        if (item && item.range.end.character > item.range.start.character) {
          results.brackets = { call, item, ghost: await ghostText(page) };
          return;
        }
        await page.keyboard.press('Escape');
        await page.keyboard.press('Home');
        await page.keyboard.press('Shift+End');
        await page.keyboard.press('Delete');
      }
      throw new Error(`no answer covered the closing bracket after ${config.bracketCalls.join(', ')}`);
    });

    await step(page, 'bracket-accepted', async () => {
      await acceptWithTab(page);
      results.bracketsSaved = await saveAndRead(page, 'brackets.py');
    });

    await step(page, 'docstring-action', async () => {
      await open(page, 'doc.py');
      await goToLineEnd(page, config.docstringLine);
      await page.keyboard.press('Control+.');
      const action = page.locator('.action-widget .monaco-list-row', { hasText: 'Generate docstring' });
      await action.waitFor({ timeout: 15000 });
    });

    await step(page, 'docstring-written', async () => {
      await page.keyboard.press('Enter');
      await waitFor(
        'the docstring in the editor',
        async () =>
          (await page.locator('.editor-group-container.active .view-line', { hasText: '"""' }).count()) > 0,
        60000,
      );
      results.docstring = await saveAndRead(page, 'doc.py');
    });

    await step(page, 'statistics', async () => {
      await runCommand(page, 'StarCoder: Show server statistics');
      const detail = page.locator('.monaco-dialog-box .dialog-message-detail');
      await detail.waitFor({ timeout: 15000 });
      results.statistics = {
        message: await page.locator('.monaco-dialog-box .dialog-message-text').innerText(),
        detail: await detail.innerText(),
      };
    });
    await page.keyboard.press('Escape');

    await step(page, 'output-channel', async () => {
      await runCommand(page, 'Output: Show Output Channels...');
      await waitFor('StarCoder among the output channels', () =>
        page.locator('.quick-input-list .monaco-list-row', { hasText: 'StarCoder' }).count(),
      );
      await page.keyboard.type('StarCoder');
      await page.keyboard.press('Enter');
      const lines = page.locator('.part.panel .monaco-editor .view-lines');
      await waitFor('the server log in the output channel', async () =>
        /key\/value cache/.test((await lines.allTextContents()).join('').replace(/\u00a0/g, ' ')),
      );
    });
  } finally {
    await browser.close();
    try {
      process.kill(-(/** @type {number} */ (server.pid)), 'SIGTERM');
    } catch {
      // already gone
    }
    fs.writeFileSync(config.results, JSON.stringify(results, null, 2));
  }
}

main().catch((error) => {
  fs.writeFileSync(config.results, JSON.stringify(results, null, 2));
  console.error(error instanceof Error ? error.message : error);
  process.exit(1);
});
