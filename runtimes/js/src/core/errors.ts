/** The one error type of the runtime: every refusal names the file, what is wrong and what to do. */
export class EdgepeftError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'EdgepeftError';
  }
}
