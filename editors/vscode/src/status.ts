// The status-bar item: starting, loading (with the server's progress), ready, off, error, or
// reconnecting to a remote server whose connection dropped.
// It asks the server for `starcoder/stats` every second while the model loads, then now and
// then to keep its tooltip's counters fresh.
import * as vscode from 'vscode';

import { STATS_REQUEST, type Stats } from './options';

/** The part of LanguageClient the status item uses. */
export interface StatsSource {
  isRunning(): boolean;
  sendRequest<R>(method: string, params?: unknown): Promise<R>;
}

type Phase = 'starting' | 'loading' | 'ready' | 'off' | 'error' | 'stopped' | 'reconnecting';

const ICONS: Record<Phase, string> = {
  starting: '$(loading~spin)',
  loading: '$(loading~spin)',
  ready: '$(check)',
  off: '$(circle-slash)',
  error: '$(error)',
  stopped: '$(debug-disconnect)',
  reconnecting: '$(sync~spin)',
};

const LOADING_POLL_MS = 1000;
const READY_POLL_MS = 15000;

export function describeStats(stats: Stats): string {
  const latency = stats.latencyMs.p50 === undefined ? 'no requests yet' : `p50 ${stats.latencyMs.p50} ms`;
  const hits = stats.cacheRequests ? Math.round((100 * stats.cacheHits) / stats.cacheRequests) : 0;
  return [
    `model ${stats.model || '(default)'}`,
    `${stats.requests} requests, ${stats.shown} shown, ${stats.accepted} accepted`,
    `latency ${latency}, prefix cache hits ${hits}%`,
  ].join('\n');
}

export class StatusItem implements vscode.Disposable {
  private readonly item: vscode.StatusBarItem;
  private timer: NodeJS.Timeout | undefined;
  private source: StatsSource | undefined;
  private phase: Phase = 'starting';
  private detail = '';
  private enabled = true;

  constructor(command: string) {
    this.item = vscode.window.createStatusBarItem('starcoder.status', vscode.StatusBarAlignment.Right, 100);
    this.item.name = 'StarCoder';
    this.item.command = command;
    this.show('starting', 'starting the server');
    this.item.show();
  }

  /** Follows a (re)started client until the model is ready, then now and then. */
  watch(source: StatsSource): void {
    this.source = source;
    this.schedule(0);
  }

  setEnabled(enabled: boolean): void {
    this.enabled = enabled;
    if (this.phase === 'ready' || this.phase === 'off') {
      this.show(enabled ? 'ready' : 'off', this.detail);
    }
  }

  show(phase: Phase, detail: string): void {
    this.phase = phase;
    this.detail = detail;
    this.item.text = `${ICONS[phase]} StarCoder`;
    this.item.tooltip = `StarCoder: ${phase}\n${detail}`;
    // What a screen reader says (the icon alone tells the phase only to the eye).
    this.item.accessibilityInformation = { label: `StarCoder: ${phase}` };
    // Reconnecting: suggestions are off for now, worth a glance but not an error.
    this.item.backgroundColor =
      phase === 'error'
        ? new vscode.ThemeColor('statusBarItem.errorBackground')
        : phase === 'reconnecting'
          ? new vscode.ThemeColor('statusBarItem.warningBackground')
          : undefined;
  }

  stop(phase: Phase, detail: string): void {
    this.source = undefined;
    clearTimeout(this.timer);
    this.show(phase, detail);
  }

  private schedule(ms: number): void {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => void this.poll(), ms);
  }

  private async poll(): Promise<void> {
    const source = this.source;
    if (!source?.isRunning()) {
      return;
    }
    try {
      const stats = await source.sendRequest<Stats>(STATS_REQUEST, {});
      if (source !== this.source) {
        return;
      }
      if (stats.error) {
        this.show('error', stats.error);
      } else if (!stats.ready) {
        this.show('loading', stats.loading);
      } else {
        this.show(this.enabled ? 'ready' : 'off', describeStats(stats));
      }
      this.schedule(stats.ready || stats.error ? READY_POLL_MS : LOADING_POLL_MS);
    } catch (error) {
      if (source === this.source) {
        this.show('error', `starcoder/stats failed: ${String(error)}`);
        this.schedule(READY_POLL_MS);
      }
    }
  }

  dispose(): void {
    clearTimeout(this.timer);
    this.item.dispose();
  }
}
